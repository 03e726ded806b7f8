//! Writes the committed seed corpus, `corpus/<target>/seed-*`: valid keys
//! and scopes, requests encoded by the generated messages, and a config
//! file that sets every file key. Run from `fuzz/` with
//! `cargo run --example make_seeds`; keys are random, so each run writes
//! new ones. Each seed is checked to be what it claims before it is written.

use std::path::Path;

use prost::Message;
use vilvik_keys::config::{Config, SETTINGS};
use vilvik_keys::proto;
use vilvik_keys_domain::{ApiKey, GeneratedKey, ScopeSet};

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    let pepper = vilvik_keys_domain::Pepper::generate();
    let keys = [
        GeneratedKey::generate(&pepper),
        GeneratedKey::generate(&pepper),
    ];
    for (i, key) in keys.iter().enumerate() {
        assert!(key.expose_secret().parse::<ApiKey>().is_ok());
        write("key", &format!("valid-{i}"), key.expose_secret());
    }
    write("key", "prefix", keys[0].prefix().as_str());
    let mut typo = keys[0].expose_secret().to_owned();
    typo.replace_range(20..21, if &typo[20..21] == "A" { "B" } else { "A" });
    assert!(typo.parse::<ApiKey>().is_err());
    write("key", "typo", typo);

    let scopes = ["datasets:read", "datasets:*", "b.x-y_z:*", "keys:admin"];
    for (i, scope) in scopes.iter().enumerate() {
        write("scope", &format!("valid-{i}"), scope);
    }
    assert!(ScopeSet::parse(&scopes).is_ok());
    write("scope", "list", scopes.join("\n"));
    write("scope", "invalid", "Datasets:read");

    let verify = [
        proto::VerifyKeyRequest {
            key: keys[0].expose_secret().to_owned(),
            required_scopes: vec!["datasets:read".into(), "models:*".into()],
            client_ip: "192.0.2.1".into(),
        },
        proto::VerifyKeyRequest {
            key: keys[1].expose_secret().to_owned(),
            ..Default::default()
        },
        proto::VerifyKeyRequest {
            key: "x".repeat(80),
            required_scopes: vec!["a.long.resource.name.here:read".into(), String::new()],
            client_ip: "2001:db8::1".into(),
        },
    ];
    for (i, request) in verify.iter().enumerate() {
        write("verify_request", &format!("{i}"), request.encode_to_vec());
    }

    let expires_at = Some(prost_types::Timestamp {
        seconds: 1_900_000_000,
        nanos: 123_456_789,
    });
    let create = [
        proto::CreateKeyRequest {
            name: "ci-runner".into(),
            description: "Deploys from CI\nowned by the platform team".into(),
            scopes: vec!["datasets:read".into(), "models:*".into()],
            expires_at,
            request_id: "3f0e6a8c-1d2b-4c5e-9f70-0123456789ab".into(),
        },
        proto::CreateKeyRequest {
            name: "  backup job ".into(),
            ..Default::default()
        },
    ];
    for (i, request) in create.iter().enumerate() {
        write(
            "create_key_request",
            &format!("{i}"),
            request.encode_to_vec(),
        );
    }

    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        })
    };
    let key_id = "key_3kTMd8sQ0Lr6bA2xYv9Z";
    let update = [
        proto::UpdateKeyRequest {
            key_id: key_id.into(),
            name: "ci-runner-2".into(),
            description: "renamed".into(),
            scopes: vec!["datasets:write".into()],
            expires_at,
            update_mask: mask(&["name", "description", "scopes", "expires_at"]),
            etag: "v3".into(),
        },
        proto::UpdateKeyRequest {
            key_id: key_id.into(),
            update_mask: mask(&["expires_at"]),
            ..Default::default()
        },
    ];
    for (i, request) in update.iter().enumerate() {
        write(
            "update_key_request",
            &format!("{i}"),
            request.encode_to_vec(),
        );
    }

    for (name, token) in [
        ("first", ""),
        ("42", "p1.42"),
        ("max", "p1.9223372036854775807"),
    ] {
        write("page_token", name, token);
    }

    // Every file key at its default, or at a sample value where it has none.
    let mut full = String::from("# every file key of src/config/settings.rs\n");
    for setting in SETTINGS {
        let Some(key) = setting.file_key else {
            continue;
        };
        let value = match (key, setting.default_value().as_deref()) {
            ("trusted_proxies", _) => r#"["10.0.0.1", "2001:db8::1"]"#.to_owned(),
            ("database_url", _) => r#""postgres://keys@127.0.0.1:5432/keys""#.to_owned(),
            ("public_verify_addr", _) => r#""keys.example.com:50052""#.to_owned(),
            (
                "free_admin_rate_per_second"
                | "free_admin_rate_burst"
                | "premium_admin_rate_per_second"
                | "premium_admin_rate_burst",
                _,
            ) => "50".to_owned(),
            ("allowed_scopes", _) => r#"["datasets:*", "reports:read"]"#.to_owned(),
            ("pepper_file", _) => r#""/etc/vilvik-keys/current.pepper""#.to_owned(),
            ("pepper_files", _) => r#"["/etc/vilvik-keys/old.pepper"]"#.to_owned(),
            ("operator_token", _) => format!("\"{}\"", "0123456789abcdef".repeat(4)),
            (_, Some(v)) if v.parse::<u64>().is_ok() || v == "false" => v.to_owned(),
            (_, Some(v)) => format!("\"{v}\""),
            (key, None) if key.ends_with("_file") => format!("\"/etc/vilvik-keys/{key}.pem\""),
            (key, None) => panic!("no sample value for {key}"),
        };
        full.push_str(&format!("{key} = {value}\n"));
    }
    let small = "admin_addr = \"0.0.0.0:50051\"\nverify_addr = \"0.0.0.0:50052\"\nlog_format = \"json\"\npremium_tier_limit = 100\n";
    for (name, text) in [("full.toml", full.as_str()), ("small.toml", small)] {
        Config::from_file_text(Path::new(name), text, &Default::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        write("config", name, text);
    }
}
