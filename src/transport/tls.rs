//! TLS for the one listener: ALPN offers h2 and http/1.1, so gRPC clients and HTTP/1.1 JSON clients both
//! connect. Handshakes run on each connection's own task, bounded by header_read_timeout
//! (transport/connections.rs).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::error::StartupError;

/// The acceptor of the listener's connections, from a PEM certificate chain and private key.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, StartupError> {
    server_config(cert_path, key_path).map(TlsAcceptor::from)
}

/// The server's TLS configuration from a PEM certificate chain and private key.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, StartupError> {
    let invalid = |path: &Path, reason: String| StartupError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    let missing = |path: &Path, expected: &str| StartupError::MissingFile {
        path: path.to_path_buf(),
        expected: expected.to_string(),
    };
    if !cert_path.is_file() {
        return Err(missing(
            cert_path,
            "the TLS certificate chain (PEM) named by tls_cert",
        ));
    }
    if !key_path.is_file() {
        return Err(missing(
            key_path,
            "the TLS private key (PEM) named by tls_key",
        ));
    }
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(cert_path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(cert_path, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| invalid(key_path, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartupError::Config(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartupError::Config(format!("TLS configuration: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
