//! TLS modes against a server with a certificate from a test CA (rcgen).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pgstack_config::{TlsMode, TlsSettings};
use pgstack_pool::{Pool, PoolError};
use pgstack_tests::TestCluster;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::OnceCell;

struct TlsServer {
    cluster: TestCluster,
    /// PEM of the CA that signed the server's certificate (for `localhost` only).
    ca: PathBuf,
    /// PEM of a CA that signed nothing the server has.
    other_ca: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

static SERVER: OnceCell<TlsServer> = OnceCell::const_new();

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

async fn server() -> anyhow::Result<&'static TlsServer> {
    SERVER
        .get_or_try_init(|| async {
            let cluster = TestCluster::start().await?;
            let ca = ca("pgstack test CA")?;
            let other = ca_other()?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            let cert = params.signed_by(&key, &ca)?;

            // The server's files, owned by the postgres user (key mode 0600).
            let server_dir = tempfile::tempdir()?;
            let postgres = nix::unistd::User::from_name("postgres")?
                .ok_or_else(|| anyhow::anyhow!("no postgres user"))?;
            let cert_path = server_dir.path().join("server.crt");
            let key_path = server_dir.path().join("server.key");
            write(&cert_path, &cert.pem(), 0o644)?;
            write(&key_path, &key.serialize_pem(), 0o600)?;
            for path in [server_dir.path(), &cert_path, &key_path] {
                nix::unistd::chown(path, Some(postgres.uid), Some(postgres.gid))?;
            }
            let admin = cluster.client("postgres").await?;
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET ssl_cert_file = '{}'",
                    cert_path.display()
                ))
                .await?;
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET ssl_key_file = '{}'",
                    key_path.display()
                ))
                .await?;
            admin.batch_execute("ALTER SYSTEM SET ssl = on").await?;
            admin.batch_execute("SELECT pg_reload_conf()").await?;
            // Wait until the reload took effect.
            for _ in 0..100 {
                let on: String = admin.query_one("SHOW ssl", &[]).await?.get(0);
                if on == "on" {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }

            let client_dir = tempfile::tempdir()?;
            let ca_path = client_dir.path().join("ca.pem");
            let other_path = client_dir.path().join("other-ca.pem");
            write(&ca_path, &ca.pem(), 0o644)?;
            write(&other_path, &other.pem(), 0o644)?;
            anyhow::Ok(TlsServer {
                cluster,
                ca: ca_path,
                other_ca: other_path,
                _dirs: (server_dir, client_dir),
            })
        })
        .await
}

fn ca_other() -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    ca("some other CA")
}

/// A pool to the TLS server under `host` ("localhost" matches the certificate).
async fn pool(host: &str, mode: TlsMode, root: Option<&Path>) -> Result<Pool, PoolError> {
    let server = server().await.map_err(|e| {
        PoolError::Config(pgstack_pool::ConfigError::Tls(format!(
            "test server: {e:#}"
        )))
    })?;
    let url = format!(
        "postgres://postgres@{host}:{}/postgres",
        server.cluster.port()
    );
    common::builder(&url)
        .map_err(|e| PoolError::Config(pgstack_pool::ConfigError::Tls(e.to_string())))?
        .tls(TlsSettings {
            mode,
            root_cert: root.map(Path::to_path_buf),
        })
        .without_circuit_breaker()
        .build()
        .await
}

async fn uses_tls(pool: &Pool) -> anyhow::Result<bool> {
    let conn = pool.get("ssl-check").await?;
    let row = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn verify_full_succeeds_with_the_right_ca_and_host() -> anyhow::Result<()> {
    let server = server().await?;
    let pool = pool("localhost", TlsMode::VerifyFull, Some(&server.ca)).await?;
    assert!(uses_tls(&pool).await?);
    Ok(())
}

#[tokio::test]
async fn verify_full_fails_clearly_for_a_wrong_host_name() -> anyhow::Result<()> {
    let server = server().await?;
    // The certificate names `localhost`, not `127.0.0.1`.
    let err = pool("127.0.0.1", TlsMode::VerifyFull, Some(&server.ca))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PoolError::Connect(_)), "{text}");
    assert!(text.contains("TLS handshake"), "{text}");
    assert!(text.contains("not valid for name"), "{text}");
    Ok(())
}

#[tokio::test]
async fn verify_full_fails_clearly_for_an_unknown_ca() -> anyhow::Result<()> {
    let server = server().await?;
    let err = pool("localhost", TlsMode::VerifyFull, Some(&server.other_ca))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("TLS handshake"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // verify-ca checks the chain too.
    let err = pool("localhost", TlsMode::VerifyCa, Some(&server.other_ca))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    Ok(())
}

#[tokio::test]
async fn verify_ca_checks_the_chain_but_not_the_host_name() -> anyhow::Result<()> {
    let server = server().await?;
    let pool = pool("127.0.0.1", TlsMode::VerifyCa, Some(&server.ca)).await?;
    assert!(uses_tls(&pool).await?);
    Ok(())
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_verifying_and_disable_does_not() -> anyhow::Result<()> {
    let _ = server().await?;
    let required = pool("127.0.0.1", TlsMode::Require, None).await?;
    assert!(uses_tls(&required).await?);
    let preferred = pool("127.0.0.1", TlsMode::Prefer, None).await?;
    assert!(uses_tls(&preferred).await?);
    let disabled = pool("127.0.0.1", TlsMode::Disable, None).await?;
    assert!(!uses_tls(&disabled).await?);
    Ok(())
}

#[tokio::test]
async fn require_fails_against_a_server_without_tls() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let err = common::builder(&cluster.url("postgres"))?
        .tls(TlsSettings {
            mode: TlsMode::Require,
            root_cert: None,
        })
        .without_circuit_breaker()
        .build()
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // prefer falls back to plain TCP.
    let pool = common::builder(&cluster.url("postgres"))?
        .tls(TlsSettings {
            mode: TlsMode::Prefer,
            root_cert: None,
        })
        .without_circuit_breaker()
        .build()
        .await?;
    assert!(!uses_tls(&pool).await?);
    Ok(())
}
