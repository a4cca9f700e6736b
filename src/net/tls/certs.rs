//! `balancer gen-certs`: a local CA and certificates signed by it for a
//! test deployment (the balancer, N servers and a client), each valid for
//! 127.0.0.1, ::1 and localhost plus the hosts asked for. Keys are written
//! readable by their owner only.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Names every certificate is valid for, besides the hosts asked for.
const LOCAL_NAMES: [&str; 3] = ["127.0.0.1", "::1", "localhost"];

/// The files written, for the caller to list.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// Writes `ca.pem`, `ca-key.pem`, `balancer.pem`/`balancer-key.pem`,
/// `server1.pem`... `serverN.pem` with their keys, and
/// `client.pem`/`client-key.pem` into `dir` (created if missing).
/// `hosts` are extra addresses or names for the balancer's and servers'
/// certificates.
pub fn generate(dir: &Path, servers: u16, hosts: &[String]) -> Result<Written, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Written::default();
    let issuer = make_ca(dir, &mut written)?;
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut leaves = vec![("balancer".to_string(), "lbft balancer")];
    for i in 1..=servers {
        leaves.push((format!("server{i}"), "lbft server"));
    }
    leaves.push(("client".to_string(), "lbft client"));
    for (file, common_name) in leaves {
        make_leaf(dir, &file, common_name, &names, &issuer, &mut written)?;
    }
    Ok(written)
}

fn failed(what: &str, e: rcgen::Error) -> String {
    format!("cannot make {what}: {e}")
}

/// Makes the CA and writes its certificate and key.
fn make_ca(dir: &Path, written: &mut Written) -> Result<Issuer<'static, KeyPair>, String> {
    let ca_key = KeyPair::generate().map_err(|e| failed("the CA key", e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| failed("the CA certificate", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a peer holding another set's CA then reports an
    // unknown issuer rather than a bad signature from a namesake.
    let tag: u32 = rand::random();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("lbft local CA {tag:08x}"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| failed("the CA certificate", e))?;
    write_file(dir, "ca.pem", &ca_cert.pem(), false, written)?;
    write_file(dir, "ca-key.pem", &ca_key.serialize_pem(), true, written)?;
    Ok(Issuer::new(ca_params, ca_key))
}

/// Makes one party's certificate, signed by the CA, valid for `names`,
/// and writes it with its key as `file.pem` and `file-key.pem`.
fn make_leaf(
    dir: &Path,
    file: &str,
    common_name: &str,
    names: &[String],
    issuer: &Issuer<'static, KeyPair>,
    written: &mut Written,
) -> Result<(), String> {
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|e| failed(&format!("{file}.pem"), e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{common_name} {file}"));
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every party both accepts and opens connections (servers register
    // with balancers, balancers connect to servers).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(|e| failed(&format!("{file}-key.pem"), e))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| failed(&format!("{file}.pem"), e))?;
    write_file(dir, &format!("{file}.pem"), &cert.pem(), false, written)?;
    write_file(
        dir,
        &format!("{file}-key.pem"),
        &key.serialize_pem(),
        true,
        written,
    )
}

/// Writes a file anew; a private one is created with mode 0600, so the key
/// is never readable by others, not even for a moment.
fn write_file(
    dir: &Path,
    name: &str,
    text: &str,
    private: bool,
    written: &mut Written,
) -> Result<(), String> {
    let path = dir.join(name);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = options.open(&path).and_then(|mut file| {
        // An existing file keeps its mode on open: narrow it explicitly.
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()
    });
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    written.files.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_leaves_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(dir.path(), 2, &["10.1.2.3".into()]).unwrap();
        let names: Vec<String> = written
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for name in [
            "ca.pem",
            "ca-key.pem",
            "balancer.pem",
            "server1.pem",
            "server2-key.pem",
            "client-key.pem",
        ] {
            assert!(names.contains(&name.to_string()), "{name} missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                fs::metadata(dir.path().join(name))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode("ca-key.pem"), 0o600);
            assert_eq!(mode("balancer-key.pem"), 0o600);
        }
        // The files load as a TLS context that both accepts and connects.
        let tls = super::super::Tls::load(
            super::super::TlsFiles {
                cert: Some(&dir.path().join("server1.pem")),
                key: Some(&dir.path().join("server1-key.pem")),
                ca: Some(&dir.path().join("ca.pem")),
                client_ca: None,
            },
            super::super::ClientCerts::Required,
            false,
            std::time::Duration::from_secs(1),
        )
        .unwrap()
        .unwrap();
        assert!(tls.accepts() && tls.connects());
    }
}
