//! rustls client configurations the engines share: the ring provider, the trust store (the
//! system's, or a PEM CA file), client certificates, and how much of the server's
//! certificate is checked.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

/// How much of the server's certificate a connection checks.
pub(crate) enum Verify {
    /// The chain up to a trusted CA and the host name.
    Full(RootCertStore),
    /// The chain up to a trusted CA only: any certificate that CA signed will do.
    Chain(RootCertStore),
    /// Nothing: the traffic is encrypted, but whoever answers is believed.
    Nothing,
}

/// A client certificate chain and its key.
pub(crate) struct ClientCert {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientCert {
    /// Reads a PEM certificate chain and its PEM private key. The error names the file and
    /// what is wrong with it, never the key.
    pub fn load(cert: &Path, key: &Path) -> Result<ClientCert, String> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| format!("{}: cannot read it: {e}", p.display()))
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        Self::from_pem(&cert_pem, &key_pem).map_err(|(which, why)| {
            let p = if which == 0 { cert } else { key };
            format!("{}: {why}", p.display())
        })
    }

    /// From PEM bytes; the error says which of the two (0 the certificate, 1 the key) is not
    /// what it should be.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<ClientCert, (u8, &'static str)> {
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or((0, "no PEM certificate in it"))?;
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|_| (1, "no PEM private key in it"))?;
        Ok(ClientCert { certs, key })
    }
}

/// The system's CA certificates (or the bundle `SSL_CERT_FILE` names, as OpenSSL tools do);
/// `None` when there are none.
pub(crate) fn system_roots() -> Option<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    (!roots.is_empty()).then_some(roots)
}

/// The CA certificates of a PEM file. The error names the file and what is wrong with it.
pub(crate) fn pem_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: not PEM ({e})", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate ({e})", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration: ring, TLS 1.2 and 1.3, the given verification and client
/// certificate. The error says what does not fit (a key that does not go with its certificate).
pub(crate) fn client_config(
    verify: Verify,
    cert: Option<ClientCert>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verify {
        Verify::Full(roots) => builder.with_root_certificates(roots),
        Verify::Chain(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(
                provider.signature_verification_algorithms,
            ))),
    };
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(c.certs, c.key)
            .map_err(|e| format!("the key does not go with the certificate ({e})"))?,
    };
    Ok(Arc::new(config))
}

/// The chain is checked as webpki checks it; only a name mismatch is let through.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain and its validity.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Any certificate is accepted; the handshake's signatures are still checked, so the session
/// is with the holder of the certificate's key, whoever that is.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}
