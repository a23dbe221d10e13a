//! Every request-body parser of the admin API, with the checks that need no state.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keyexportd::api::fuzzing::request_bodies(data);
});
