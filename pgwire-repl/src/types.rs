//! LSN, timeline and system-identifier types.
