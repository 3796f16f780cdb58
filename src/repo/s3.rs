//! PLACEHOLDER until the object-store module lands: the API the repository is written against.
#![allow(dead_code, unused_variables)]

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub ca_file: Option<PathBuf>,
}

impl S3Config {
    pub fn from_url(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<S3Config> {
        Err(Error::config("object storage is not built in yet"))
    }
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {}

impl S3Store {
    pub fn connect(cfg: &S3Config) -> Result<S3Store> {
        Err(Error::config("object storage is not built in yet"))
    }
    pub fn url(&self) -> String {
        String::new()
    }
    pub fn check(&self) -> Result<()> {
        unimplemented!()
    }
    pub fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        unimplemented!()
    }
    pub fn list_files(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        unimplemented!()
    }
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        unimplemented!()
    }
    pub fn read_all(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        unimplemented!()
    }
    pub fn get(&self, rel: &str) -> Result<Box<dyn io::Read + Send>> {
        unimplemented!()
    }
    pub fn put_small(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        unimplemented!()
    }
    pub fn writer(&self, rel: &str) -> Result<S3Writer> {
        unimplemented!()
    }
    pub fn delete(&self, rel: &str) -> Result<()> {
        unimplemented!()
    }
    pub fn delete_prefix(&self, rel: &str) -> Result<usize> {
        unimplemented!()
    }
    pub fn lock(&self, rel: &str, holder: &str, lease: Duration, wait: Duration) -> Result<S3Lock> {
        unimplemented!()
    }
    pub fn abort_stale_uploads(&self) -> Result<usize> {
        unimplemented!()
    }
}

pub struct S3Writer {}
impl S3Writer {
    pub fn finish(self) -> Result<u64> {
        unimplemented!()
    }
    pub fn abort(self) {}
}
impl io::Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        unimplemented!()
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct S3Lock {}
