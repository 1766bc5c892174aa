//! The run token: a shared secret that the coordinator and the workers' gradient transport
//! require from every peer. It comes from `SIMMIM_TOKEN` or the file named by
//! `SIMMIM_TOKEN_FILE` (a mounted Kubernetes Secret), never from a flag or a config file, and
//! is never logged.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

pub const TOKEN_ENV: &str = "SIMMIM_TOKEN";
pub const TOKEN_FILE_ENV: &str = "SIMMIM_TOKEN_FILE";
pub const TOKEN_HEADER: &str = "x-simmim-token";

/// The configured token, if any. An unreadable or empty token file is an error naming it.
pub fn token_from_env() -> Result<Option<String>, String> {
    if let Ok(token) = std::env::var(TOKEN_ENV) {
        if !token.trim().is_empty() {
            return Ok(Some(token.trim().to_string()));
        }
    }
    if let Ok(path) = std::env::var(TOKEN_FILE_ENV) {
        let token =
            std::fs::read_to_string(&path).map_err(|e| format!("{TOKEN_FILE_ENV}={path}: {e}"))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("{TOKEN_FILE_ENV}={path}: the file is empty"));
        }
        return Ok(Some(token.to_string()));
    }
    Ok(None)
}

/// Adds the token to every request a client sends.
#[derive(Clone)]
pub struct AddToken(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl AddToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token {
            None => Ok(Self(None)),
            Some(t) => MetadataValue::try_from(t)
                .map(|v| Self(Some(v)))
                .map_err(|_| "the run token must be printable ASCII".to_string()),
        }
    }
}

impl Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(TOKEN_HEADER, token.clone());
        }
        Ok(request)
    }
}

/// Compares without an early exit, so response timing says nothing about the token.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub type Client = crate::pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddToken>,
>;

/// Environment variable naming the PEM file of the CA (or self-signed certificate) that
/// clients trust for an `https://` coordinator URL.
pub const TLS_CA_ENV: &str = "SIMMIM_TLS_CA";

/// A channel to the coordinator at `url`: plain for `http://`; for `https://`, TLS that trusts
/// `SIMMIM_TLS_CA` when set, else the system's roots.
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Channel::from_shared(url.to_string()).map_err(|e| {
        format!("`{url}` is not a coordinator URL (expected http(s)://host:port): {e}")
    })?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    match std::env::var(TLS_CA_ENV) {
        Ok(path) => {
            let pem = std::fs::read(&path).map_err(|e| format!("{TLS_CA_ENV}={path}: {e}"))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        Err(_) => tls = tls.with_native_roots(),
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| format!("TLS for {url}: {e}"))
}
