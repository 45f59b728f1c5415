//! Development certificates (`herdctl certs init`): a certificate authority and one certificate
//! per service, each naming its service by a SPIFFE-style URI SAN
//! (`spiffe://<trust-domain>/herd/<service>`). For development and tests: production meshes take
//! their certificates from their own CA (cert-manager, SPIRE, Vault).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The services of the reference mesh, each given a certificate by default.
pub const MESH_SERVICES: [&str; 4] = ["gateway", "pricing", "tax", "currency"];

/// A trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-` and `_`.
fn check_trust_domain(trust_domain: &str) -> anyhow::Result<()> {
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
    {
        bail!(
            "--trust-domain: lowercase letters, digits, '.', '-' and '_' only, got {trust_domain:?}"
        );
    }
    Ok(())
}

/// A DNS name, possibly a wildcard's (`*.etcd.herd.svc.cluster.local`): labels of letters,
/// digits and inner `-`.
fn check_dns(name: &str) -> anyhow::Result<()> {
    let labels = name.strip_prefix("*.").unwrap_or(name);
    let valid = !labels.is_empty()
        && labels.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        bail!("--dns: {name:?} is not a DNS name");
    }
    Ok(())
}

fn check_service(service: &str) -> anyhow::Result<()> {
    if service.is_empty()
        || !service
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("--services: lowercase letters, digits and '-' only, got {service:?}");
    }
    Ok(())
}

/// Valid from an hour ago (clocks differ) for `validity`.
fn validity_period(params: &mut CertificateParams, validity: Duration) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after =
        now + time::Duration::try_from(validity).context("--validity: too long a duration")?;
    Ok(())
}

/// Writes `contents` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The CA in `dir`, created if absent: its issuer, and whether it was created.
fn ca(
    dir: &Path,
    trust_domain: &str,
    validity: Duration,
) -> anyhow::Result<(Issuer<'static, KeyPair>, bool)> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() || key.exists() {
        let key_pem = std::fs::read_to_string(&key)
            .with_context(|| format!("reading the CA key {}", key.display()))?;
        let cert_pem = std::fs::read_to_string(&cert)
            .with_context(|| format!("reading the CA certificate {}", cert.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("the CA key is not a PEM private key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .context("the CA certificate is not a PEM certificate")?;
        return Ok((issuer, false));
    }
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("herd CA for {trust_domain}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "herd");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity_period(&mut params, validity.saturating_mul(10))?;
    let key = KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    write(&cert, &certificate.pem(), false)?;
    write(&dir.join("ca-key.pem"), &key.serialize_pem(), true)?;
    Ok((Issuer::new(params, key), true))
}

/// Writes the CA (if absent) and a certificate per service into `dir`; the files written, each
/// with what it is.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    services: &[String],
    validity: Duration,
) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    init_with_names(dir, trust_domain, services, &[], validity)
}

/// As [`init`], each certificate also naming the DNS names in `dns` (wildcards allowed): for
/// servers reached by host name, such as etcd's members in Kubernetes.
pub fn init_with_names(
    dir: &Path,
    trust_domain: &str,
    services: &[String],
    dns: &[String],
    validity: Duration,
) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    check_trust_domain(trust_domain)?;
    for service in services {
        check_service(service)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (issuer, created) = ca(dir, trust_domain, validity)?;
    let mut written = Vec::new();
    if created {
        written.push((dir.join("ca.pem"), "CA"));
        written.push((dir.join("ca-key.pem"), "CA key"));
    }
    for service in services {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("herd-{service}"));
        params.subject_alt_names = vec![
            SanType::URI(super::identity(trust_domain, service).try_into()?),
            // So that a person can reach a local instance with grpcurl -cacert.
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        for name in dns {
            check_dns(name)?;
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity_period(&mut params, validity)?;
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}-key.pem")),
        );
        // The key first: a reader that sees the new certificate finds its key already there.
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &certificate.pem(), false)?;
        written.push((cert_path, "cert"));
        written.push((key_path, "key"));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn der(path: &Path) -> Vec<u8> {
        let pem = std::fs::read(path).expect("written");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
        pem.contents
    }

    fn services() -> Vec<String> {
        MESH_SERVICES.map(String::from).to_vec()
    }

    #[test]
    fn each_service_gets_its_identity_signed_by_the_ca() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = init(
            dir.path(),
            "herd.local",
            &services(),
            Duration::from_secs(3600),
        )
        .expect("written");
        assert_eq!(written.len(), 2 + 2 * MESH_SERVICES.len());
        let ca_der = der(&dir.path().join("ca.pem"));
        let (_, ca) = X509Certificate::from_der(&ca_der).expect("the CA parses");
        assert!(ca.is_ca());
        for service in MESH_SERVICES {
            let cert_der = der(&dir.path().join(format!("{service}.pem")));
            let (_, cert) = X509Certificate::from_der(&cert_der).expect("parses");
            cert.verify_signature(Some(ca.public_key()))
                .expect("signed by the CA");
            assert_eq!(cert.issuer(), ca.subject());
            let uris: Vec<String> = cert
                .subject_alternative_name()
                .expect("well formed")
                .expect("present")
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect();
            assert_eq!(uris, vec![format!("spiffe://herd.local/herd/{service}")]);
            let eku = cert
                .extended_key_usage()
                .expect("well formed")
                .expect("present")
                .value;
            assert!(eku.server_auth && eku.client_auth);
            let lifetime =
                cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
            assert_eq!(
                lifetime,
                2 * 3600,
                "an hour back for clock skew, then the validity"
            );
            let mode = std::fs::metadata(dir.path().join(format!("{service}-key.pem")))
                .expect("written")
                .permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn running_again_keeps_the_ca_and_rotates_the_certificates() {
        let dir = tempfile::tempdir().expect("temp dir");
        let one = ["tax".to_string()];
        init(dir.path(), "herd.local", &one, Duration::from_secs(3600)).expect("written");
        let (ca, cert) = (
            std::fs::read(dir.path().join("ca.pem")).expect("ca"),
            der(&dir.path().join("tax.pem")),
        );
        let written =
            init(dir.path(), "herd.local", &one, Duration::from_secs(3600)).expect("again");
        assert_eq!(written.len(), 2, "the CA is kept: {written:?}");
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
        let rotated = der(&dir.path().join("tax.pem"));
        assert_ne!(rotated, cert);
        let ca_der = der(&dir.path().join("ca.pem"));
        let (_, ca) = X509Certificate::from_der(&ca_der).expect("parses");
        let (_, rotated) = X509Certificate::from_der(&rotated).expect("parses");
        rotated
            .verify_signature(Some(ca.public_key()))
            .expect("the new certificate is signed by the same CA");
    }

    #[test]
    fn names_that_are_not_identities_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = init(
            dir.path(),
            "Herd Local",
            &services(),
            Duration::from_secs(60),
        )
        .expect_err("not a trust domain");
        assert!(err.to_string().contains("--trust-domain"), "{err}");
        let err = init(
            dir.path(),
            "herd.local",
            &["tax/../x".to_string()],
            Duration::from_secs(60),
        )
        .expect_err("not a service name");
        assert!(err.to_string().contains("--services"), "{err}");
    }

    #[test]
    fn extra_dns_names_are_named_by_every_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dns = ["*.etcd.herd.svc.cluster.local".to_string()];
        init_with_names(
            dir.path(),
            "herd.local",
            &["etcd".to_string()],
            &dns,
            Duration::from_secs(60),
        )
        .expect("written");
        let cert_der = der(&dir.path().join("etcd.pem"));
        let (_, cert) = X509Certificate::from_der(&cert_der).expect("parses");
        let names: Vec<String> = cert
            .subject_alternative_name()
            .expect("well formed")
            .expect("present")
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["localhost", "*.etcd.herd.svc.cluster.local"]);
        let err = init_with_names(
            dir.path(),
            "herd.local",
            &["etcd".to_string()],
            &["not a name".to_string()],
            Duration::from_secs(60),
        )
        .expect_err("not a DNS name");
        assert!(format!("{err:#}").contains("--dns"), "{err:#}");
    }
}
