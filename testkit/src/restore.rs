//! Starting a cluster on an existing data directory (a restored backup).
//!
//! A child module of `cluster` (declared there) so that it can build a [`Cluster`].

use super::*;

/// Gives `path` and everything beneath it to the server user; follows the
/// `pg_tblspc/<oid>` links of a data directory to their tablespace directories.
fn give_tree(user: Option<&ServerUser>, path: &Path) -> std::io::Result<()> {
    env::give_to(user, path)?;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)?;
        return give_tree(user, &target);
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            give_tree(user, &entry?.path())?;
        }
    }
    Ok(())
}

impl Cluster {
    /// Starts a server on an existing data directory, for example a restored base
    /// backup. The cluster gets its own port, socket directory, log and `pg_hba.conf`
    /// (testkit's defaults plus the options' lines); settings from `opts` are appended
    /// to the directory's `postgresql.conf`. When the tests run as root, the directory
    /// (and the tablespace directories its `pg_tblspc` links point to) is given to the
    /// server's OS user; its parent directories must be searchable by that user.
    ///
    /// The data directory itself is left in place on drop; only the cluster's own
    /// temporary directory (socket, log) is removed.
    ///
    /// ```no_run
    /// let restored = testkit::Cluster::start_on_data_dir(
    ///     std::path::Path::new("/tmp/backup/data"),
    ///     testkit::ClusterOptions::new(),
    /// );
    /// # let _ = restored;
    /// ```
    pub fn start_on_data_dir(data_dir: &Path, opts: ClusterOptions) -> Cluster {
        let bin_dir = env::bin_dir_from_env();
        let (major, version) = env::server_version(&bin_dir);
        env::ensure_binaries(&bin_dir, Some(major));
        let user = env::server_user();
        let user_ref = user.as_ref();
        let root = crate::cluster::scratch_dir("pgrepl-r-");
        let root_path = root.path().to_path_buf();
        let result = fs::set_permissions(&root_path, fs::Permissions::from_mode(0o755))
            .and_then(|()| env::give_to(user_ref, &root_path))
            .and_then(|()| give_tree(user_ref, data_dir))
            .and_then(|()| fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)));
        if let Err(err) = result {
            panic!("testkit: could not prepare {}: {err}", data_dir.display());
        }
        let socket_dir = root_path.join("sock");
        mkdir(&socket_dir, 0o755, user_ref);
        let base_conf = fs::read_to_string(data_dir.join("postgresql.conf")).unwrap_or_else(|e| {
            panic!(
                "testkit: could not read {}: {e}",
                data_dir.join("postgresql.conf").display()
            )
        });
        let mut cluster = Cluster {
            bin_dir,
            major,
            version,
            root: Some(root),
            log_path: root_path.join("server.log"),
            root_path,
            data_dir: data_dir.to_path_buf(),
            socket_dir,
            port: 0,
            user,
            child: None,
            tls: None,
            base_conf,
            opts,
            log_dumped: false,
        };
        cluster.write_hba();
        cluster.launch(true);
        cluster
    }
}
