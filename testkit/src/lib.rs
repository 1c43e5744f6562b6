//! Throwaway real PostgreSQL clusters for tests.
