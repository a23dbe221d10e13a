//! The config file parser and its validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) = keyexportd::config::Config::parse(text)
    {
        let _ = config.validate();
    }
});
