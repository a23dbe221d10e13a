//! The daemon: configuration, the data directory, the master key, wiring of the layers,
//! the background tasks, signals and an orderly shutdown.
//!
//! One `watch` channel is the shutdown signal: SIGTERM or SIGINT set it, the API stops
//! accepting and drains, every background task returns, and the store is flushed last.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::crypto::MasterKey;
use crate::export::{ExportSettings, Exporters};
use crate::keys::{Keys, KeysSettings};
use crate::store::Store;

/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Startup(String),
}

fn startup(message: impl Into<String>) -> DaemonError {
    DaemonError::Startup(message.into())
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

/// env_logger behind a lock, so SIGHUP can swap in a new filter.
struct ReloadableLogger {
    inner: RwLock<env_logger::Logger>,
}

impl log::Log for ReloadableLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .enabled(metadata)
    }
    fn log(&self, record: &log::Record<'_>) {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .log(record)
    }
    fn flush(&self) {}
}

static LOGGER: OnceLock<ReloadableLogger> = OnceLock::new();

fn build_logger(spec: &str) -> env_logger::Logger {
    env_logger::Builder::new()
        .parse_filters(spec)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .build()
}

/// The filter in force: `RUST_LOG` when set, else the config's `log.level`.
fn log_spec(config: &Config) -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone())
}

/// Installs the logger (once per process) or swaps its filter.
pub fn set_log_filter(spec: &str) {
    let logger = build_logger(spec);
    let max = logger.filter();
    match LOGGER.get() {
        Some(l) => *l.inner.write().unwrap_or_else(|e| e.into_inner()) = logger,
        None => {
            let l = LOGGER.get_or_init(|| ReloadableLogger {
                inner: RwLock::new(logger),
            });
            let _ = log::set_logger(l);
        }
    }
    log::set_max_level(max);
}

// ---------------------------------------------------------------------------------------
// Data directory and master key
// ---------------------------------------------------------------------------------------

fn prepare_data_dir(dir: &Path) -> Result<(), DaemonError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                startup(format!(
                    "cannot create storage.data_dir {}: {e}",
                    dir.display()
                ))
            })?;
        log::info!("created data directory {}", dir.display());
    }
    let meta = std::fs::metadata(dir).map_err(|e| {
        startup(format!(
            "cannot read storage.data_dir {}: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(startup(format!(
            "storage.data_dir {} is not a directory",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        log::warn!(
            "data directory {} is accessible by other users (mode {:o}); chmod 700 it",
            dir.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

fn read_master_key(path: &Path, source: &str) -> Result<MasterKey, DaemonError> {
    let mode = std::fs::metadata(path)
        .map_err(|e| {
            startup(format!(
                "cannot read the master key {} ({source}): {e}",
                path.display()
            ))
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(startup(format!(
            "the master key {} ({source}) is accessible by other users (mode {:o}); \
             run chmod 600 on it. The daemon does not start with an exposed master key",
            path.display(),
            mode & 0o777
        )));
    }
    let text = std::fs::read(path).map_err(|e| {
        startup(format!(
            "cannot read the master key {} ({source}): {e}",
            path.display()
        ))
    })?;
    let key = MasterKey::from_json(&text)
        .map_err(|e| startup(format!("master key {} ({source}): {e}", path.display())))?;
    log::info!(
        "master key id {} loaded from {} ({source})",
        key.key_id(),
        path.display()
    );
    Ok(key)
}

/// `security.master_key_file`, else `$CREDENTIALS_DIRECTORY/master.key`, else
/// `<data_dir>/master.key`, generated only for a new data directory.
fn load_master_key(config: &Config, db_exists: bool) -> Result<MasterKey, DaemonError> {
    if let Some(path) = &config.security.master_key_file {
        return read_master_key(path, "security.master_key_file");
    }
    if let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") {
        let path = PathBuf::from(dir).join(MASTER_KEY_FILE);
        if path.exists() {
            return read_master_key(&path, "systemd credential");
        }
    }
    let path = config.storage.data_dir.join(MASTER_KEY_FILE);
    if path.exists() {
        return read_master_key(&path, "data directory");
    }
    if db_exists {
        return Err(startup(format!(
            "no master key found, but {} holds keys wrapped by one: set \
             security.master_key_file, pass it as the systemd credential 'master.key', or put \
             it back at {}",
            config.storage.data_dir.display(),
            path.display()
        )));
    }
    let key = MasterKey::generate().map_err(|e| startup(e.to_string()))?;
    let json = key.to_json().map_err(|e| startup(e.to_string()))?;
    crate::auth::write_secret_file(&path, &json)
        .map_err(|e| startup(format!("cannot write {}: {e}", path.display())))?;
    log::warn!(
        "generated a new master key at {} (id {}): back it up apart from the data directory; \
         in production provide it with security.master_key_file or systemd LoadCredential=",
        path.display(),
        key.key_id()
    );
    Ok(key)
}

/// Writes a fresh master key to `path` (for `keyexportd generate-master-key`).
pub fn generate_master_key(path: &Path) -> Result<u32, String> {
    if path.exists() {
        return Err(format!(
            "{} exists; refusing to overwrite a master key",
            path.display()
        ));
    }
    let key = MasterKey::generate().map_err(|e| e.to_string())?;
    let json = key.to_json().map_err(|e| e.to_string())?;
    crate::auth::write_secret_file(path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key.key_id())
}

// ---------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------

/// An opened data directory: the database, the master key and the keys domain.
pub struct DataDir {
    pub store: Arc<Store>,
    pub master: Arc<MasterKey>,
    pub keys: Arc<Keys>,
}

/// Opens (creating if new) the data directory of `config`: used by the daemon and by
/// offline tools such as `keyexportd restore`. The database lock keeps them apart.
pub fn open_data_dir(config: &Config) -> Result<DataDir, DaemonError> {
    // Every file the daemon creates (database, keys, tokens, exports) is private.
    // SAFETY: umask only changes the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let data_dir = &config.storage.data_dir;
    prepare_data_dir(data_dir)?;
    let db_dir = data_dir.join("db");
    let master = Arc::new(load_master_key(config, db_dir.exists())?);
    let store = Store::open_with(
        &db_dir,
        config.storage.cache_capacity_mb << 20,
        config.storage.min_free_mb << 20,
        Duration::from_micros(config.storage.group_commit_linger_us),
    )
    .map_err(|e| {
        let text = e.to_string();
        if text.contains("lock") || text.contains("WouldBlock") {
            startup(format!(
                "the data directory {} is in use by another keyexportd (its database is locked)",
                data_dir.display()
            ))
        } else {
            startup(format!(
                "cannot open the database in {}: {text}",
                db_dir.display()
            ))
        }
    })?;
    let store = Arc::new(store);
    let keys = Keys::open(
        store.clone(),
        master.clone(),
        KeysSettings {
            default_rotation: config.keys.rotation,
            grace: config.keys.grace,
            stream_retention: config.keys.stream_retention,
        },
    )
    .map_err(|e| startup(e.to_string()))?;
    Ok(DataDir {
        store,
        master,
        keys: Arc::new(keys),
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let config = Config::load(config_path.as_deref())?;
    set_log_filter(&log_spec(&config));
    let listen = config.listen_addr()?;
    let data_dir = config.storage.data_dir.clone();
    let DataDir {
        store,
        master,
        keys,
    } = open_data_dir(&config)?;
    let exporters = Exporters::open(
        store.clone(),
        keys.clone(),
        master.clone(),
        ExportSettings {
            key_export_allowed: config.account.key_export_allowed,
            min_interval: config.export.min_interval,
            max_keys_per_object: config.export.max_keys_per_object,
        },
        &data_dir,
    )
    .map_err(|e| startup(e.to_string()))?;
    let auth = Arc::new(
        Auth::open(store.clone(), &data_dir.join(ADMIN_TOKEN_FILE))
            .map_err(|e| startup(e.to_string()))?,
    );
    if let Some(path) = &config.security.tokens_file {
        let loaded = auth
            .load_tokens_file(path)
            .map_err(|e| startup(e.to_string()))?;
        log::info!("security.tokens_file: {} token(s)", loaded.len());
    }

    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(api::tls_acceptor(cert, key).map_err(startup)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| startup(format!("cannot listen on {listen} (server.listen): {e}")))?;
    let bound = api::local_addr(&listener).unwrap_or(listen);
    log::info!(
        "keyexportd {} listening on {bound}{}; admin token in {}",
        env!("CARGO_PKG_VERSION"),
        if tls.is_some() { " (TLS)" } else { "" },
        data_dir.join(ADMIN_TOKEN_FILE).display()
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    // Set when the daemon stops because it cannot go on; `run` then fails.
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let signals = tokio::spawn(handle_signals(
        config_path.clone(),
        config.clone(),
        auth.clone(),
        shutdown_tx.clone(),
    ));
    let janitor = {
        let (keys, every) = (
            keys.clone(),
            Duration::from_secs(config.keys.purge_interval.0),
        );
        let (shutdown, stop, fatal) = (shutdown_rx.clone(), shutdown_tx.clone(), fatal.clone());
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("janitor".into())
            .spawn(move || run_janitor(runtime, keys, every, shutdown, stop, fatal))
            .map_err(|e| startup(format!("cannot start the janitor thread: {e}")))?
    };

    let state = Arc::new(ApiState {
        keys: keys.clone(),
        exporters: exporters.clone(),
        auth,
        account: config.account.clone(),
        metrics: api::Metrics::new(keys.clone(), exporters.clone()),
    });
    let drain = config.export.shutdown_timeout.as_duration();
    api::serve(listener, state, shutdown_rx, drain, tls).await;
    // Every answered key is on disk now; the exporters close their last batches.
    exporters.shutdown(drain).await;

    let _ = tokio::task::spawn_blocking(move || janitor.join()).await;
    signals.abort();
    if let Some(reason) = fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(startup(reason));
    }
    store
        .close()
        .map_err(|e| startup(format!("final flush of the database failed: {e}")))?;
    log::info!("stopped cleanly");
    Ok(())
}

/// SIGTERM/SIGINT start the shutdown; SIGHUP re-reads the config's live parts.
async fn handle_signals(
    config_path: Option<PathBuf>,
    mut current: Config,
    auth: Arc<Auth>,
    shutdown: Arc<watch::Sender<bool>>,
) {
    let mut signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return;
        }
    };
    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => {
                log::info!("SIGHUP: reloading the configuration");
                match Config::load(config_path.as_deref()) {
                    Ok(new) => {
                        if std::env::var_os("RUST_LOG").is_some() {
                            log::info!(
                                "RUST_LOG is set and keeps the log filter; log.level ignored"
                            );
                        } else if new.log.level != current.log.level {
                            set_log_filter(&new.log.level);
                            log::info!(
                                "log.level changed from '{}' to '{}'",
                                current.log.level,
                                new.log.level
                            );
                        } else {
                            log::info!("log.level unchanged ('{}')", new.log.level);
                        }
                        match &new.security.tokens_file {
                            Some(path) => match auth.load_tokens_file(path) {
                                Ok(changes) if changes.is_empty() => {
                                    log::info!("security.tokens_file unchanged")
                                }
                                Ok(changes) => log::info!(
                                    "security.tokens_file reloaded: {}",
                                    changes.join(", ")
                                ),
                                Err(e) => log::error!("{e}; the previous tokens stay in force"),
                            },
                            None if current.security.tokens_file.is_some() => {
                                log::warn!(
                                    "security.tokens_file was removed from the config; its \
                                     tokens stay in force until the daemon restarts"
                                )
                            }
                            None => {}
                        }
                        if let Err(e) = auth.reload() {
                            log::error!("reloading tokens failed: {e}");
                        }
                        current = new;
                    }
                    Err(e) => log::error!("SIGHUP: config not reloaded, keeping the old one: {e}"),
                }
            }
            _ => {
                log::info!("signal {signal}: shutting down");
                let _ = shutdown.send(true);
            }
        }
    }
}

/// Purges expired keys and trims key streams every `every`, on a thread of its own at a
/// lower CPU priority (a million keys expiring at once are seconds of work, which must
/// not be taken from the threads that answer requests), and watches the store: after an
/// I/O error sled refuses every write for good, so the daemon stops with an error
/// (systemd restarts it and sled recovers from its log). The first round comes one
/// interval after the start, so that a start serves first: after a long stop, that
/// round may drop the current-key pointers of many rotation periods, work that would
/// otherwise meet the first requests' cold caches. `runtime` serves only to wait for the
/// next round or the shutdown signal, whichever comes first.
fn run_janitor(
    runtime: tokio::runtime::Handle,
    keys: Arc<Keys>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    stop: Arc<watch::Sender<bool>>,
    fatal: Arc<std::sync::Mutex<Option<String>>>,
) {
    crate::export::lower_priority();
    let mut round = std::time::Instant::now();
    loop {
        let until_next_round = every.saturating_sub(round.elapsed());
        let stopping = runtime.block_on(async {
            tokio::time::timeout(until_next_round, shutdown.wait_for(|s| *s))
                .await
                .is_ok()
        });
        if stopping {
            return;
        }
        round = std::time::Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keys.maintain())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("key maintenance failed, will retry: {e}"),
            Err(_) => log::error!("key maintenance panicked; it runs again next round"),
        }
        if let Some(failure) = keys.store_failure() {
            let reason = format!(
                "the database hit an I/O error and accepts no more writes ({failure}); \
                 stopping so that a restart recovers it from its log"
            );
            log::error!("{reason}");
            *fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
            let _ = stop.send(true);
            return;
        }
    }
}
