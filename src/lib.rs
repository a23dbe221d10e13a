//! keyexportd: per-session data-encryption keys, rotated on a timer and exported as
//! JSON Lines files so that the data owner can decrypt long after the daemon forgot them.
//!
//! Layers (data flows one way; a module knows only the ones beneath it):
//! `api` -> `keys` -> `store`, `crypto`; `api` -> `export` -> `keys`, `sink`;
//! `daemon` wires them together; `cli` talks to `api` over HTTP.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod duration;
pub mod export;
pub mod keyfile;
pub mod keys;
pub mod names;
pub mod owner;
pub mod store;
