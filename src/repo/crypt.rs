//! age encryption of backup sets: keys from the environment, a sealer per new set, and the
//! opener of a set from its recorded recipients (or, in passphrase mode, its `identity.age`).
//!
//! A stored file is a plain age v1 file, so `age -d -i key.txt f.zst.age | zstd -d` recovers
//! it without dbkeeper. In passphrase mode each set gets a fresh X25519 key, sealed into the
//! set as `identity.age` with the passphrase: scrypt costs about a second by design, and
//! paying it once per set instead of once per file keeps a set of hundreds of files fast.
//!
//! Reading, the header stays age's (parsing, recipients, MAC); the payload is opened here by
//! [`Payload`] with ring, for speed (see there).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use age::secrecy::{ExposeSecret, SecretString};
use age::{DecryptError, ssh, x25519};
use age_core::format::{FileKey, Stanza};
use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::hkdf;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::secret::{self, Secret};

pub type SealWriter<W> = age::stream::StreamWriter<W>;

/// age's STREAM (age-encryption.org/v1, "Payload"): the plaintext goes in 64 KiB chunks, each
/// sealed with ChaCha20-Poly1305 and followed by its 16-byte tag.
pub const CHUNK: usize = 64 * 1024;
pub const TAG: usize = 16;
pub const SEALED_CHUNK: usize = CHUNK + TAG;

const RECIPIENTS: &str = "DBKEEPER_AGE_RECIPIENTS";
const RECIPIENTS_FILE: &str = "DBKEEPER_AGE_RECIPIENTS_FILE";
const IDENTITY_FILE: &str = "DBKEEPER_AGE_IDENTITY_FILE";
/// Resolved with [`secret::resolve`], so `DBKEEPER_AGE_PASSPHRASE_FILE` works beside it.
const PASSPHRASE: &str = "DBKEEPER_AGE_PASSPHRASE";
const PASSPHRASE_FILE: &str = "DBKEEPER_AGE_PASSPHRASE_FILE";
/// What manifests record for a passphrase-mode set: the set's own key is not worth naming,
/// since nobody holds it outside `identity.age`.
const SCRYPT: &str = "scrypt";

/// A public key files are sealed to.
#[derive(Clone)]
enum AnyRecipient {
    X25519(x25519::Recipient),
    Ssh(ssh::Recipient),
}

impl AnyRecipient {
    fn as_dyn(&self) -> &dyn age::Recipient {
        match self {
            AnyRecipient::X25519(r) => r,
            AnyRecipient::Ssh(r) => r,
        }
    }

    fn fingerprint(&self) -> String {
        match self {
            AnyRecipient::X25519(r) => fingerprint("x25519", &r.to_string()),
            AnyRecipient::Ssh(r) => ssh_fingerprint(r),
        }
    }
}

/// `<type>:<16 hex of SHA-256 of the canonical key string>`: short enough for a log line,
/// long enough that two keys of one deployment never share it.
fn fingerprint(kind: &str, canonical: &str) -> String {
    let digest = hex::encode(Sha256::digest(canonical.as_bytes()));
    format!("{kind}:{}", &digest[..16])
}

/// ssh keys are fingerprinted without their comment: the same key under another comment
/// (user@host differs per machine) is the same recipient.
fn ssh_fingerprint(r: &ssh::Recipient) -> String {
    let canonical = r.to_string();
    let kind = match r {
        ssh::Recipient::SshEd25519(..) => "ssh-ed25519",
        ssh::Recipient::SshRsa(..) => "ssh-rsa",
    };
    fingerprint(kind, &canonical)
}

type DynIdentity = Arc<dyn age::Identity + Send + Sync>;

/// A private key with the fingerprint of its public half, so that a set's recorded
/// recipients can be matched without trying a decryption.
#[derive(Clone)]
struct Key {
    identity: DynIdentity,
    fingerprint: String,
}

/// The configured keys. `None` from [`Crypto::from_env`] when no age variable is set.
pub struct Crypto {
    recipients: Vec<AnyRecipient>,
    identities: Vec<Key>,
    passphrase: Option<Secret>,
    /// Passphrase mode: set keys already unsealed, by SHA-256 of their `identity.age`, so
    /// listing or re-reading a set pays scrypt once per process, not once per open.
    set_keys: Mutex<HashMap<String, Key>>,
}

impl fmt::Debug for Crypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crypto")
            .field("recipients", &self.fingerprints())
            .field(
                "identities",
                &self
                    .identities
                    .iter()
                    .map(|k| k.fingerprint.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("passphrase", &self.passphrase.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Crypto {
    /// Reads `DBKEEPER_AGE_RECIPIENTS` (or `_FILE`), `DBKEEPER_AGE_IDENTITY_FILE` and
    /// `DBKEEPER_AGE_PASSPHRASE` (or `_FILE`). Empty values count as unset.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Crypto>> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let recipients_var = get(RECIPIENTS);
        let recipients_file = get(RECIPIENTS_FILE);
        let identity_file = get(IDENTITY_FILE);
        let passphrase = secret::resolve(PASSPHRASE, None, env)?;

        let recipients = match (recipients_var, recipients_file) {
            (Some(_), Some(_)) => {
                return Err(Error::config(format!(
                    "both {RECIPIENTS} and {RECIPIENTS_FILE} are set; set only one"
                )));
            }
            (Some(v), None) => Some(parse_recipients(&v, RECIPIENTS, true)?),
            (None, Some(path)) => {
                let what = format!("{RECIPIENTS_FILE}={path}");
                let text = read_text(&what, &path)?;
                Some(parse_recipients(text.expose_secret(), &what, false)?)
            }
            (None, None) => None,
        };
        if let (Some(_), Some(_)) = (&recipients, &passphrase) {
            let pass = if env(PASSPHRASE_FILE).is_some_and(|v| !v.is_empty()) {
                PASSPHRASE_FILE
            } else {
                PASSPHRASE
            };
            return Err(Error::config(format!(
                "both age recipients and {pass} are set; use recipients (public keys) or a passphrase, not both"
            )));
        }
        let identities = match identity_file {
            Some(path) => {
                let what = format!("{IDENTITY_FILE}={path}");
                let text = read_text(&what, &path)?;
                parse_identities(text.expose_secret(), &what)?
            }
            None => Vec::new(),
        };
        if recipients.is_none() && identities.is_empty() && passphrase.is_none() {
            return Ok(None);
        }
        Ok(Some(Crypto {
            recipients: recipients.unwrap_or_default(),
            identities,
            passphrase,
            set_keys: Mutex::new(HashMap::new()),
        }))
    }

    /// An identity or a passphrase is configured.
    pub fn can_decrypt(&self) -> bool {
        !self.identities.is_empty() || self.passphrase.is_some()
    }

    /// Recipients or a passphrase are configured. An identity alone makes a decrypt-only
    /// host: it may restore, but a backup must refuse rather than write plain sets.
    pub fn can_encrypt(&self) -> bool {
        !self.recipients.is_empty() || self.passphrase.is_some()
    }

    /// Fingerprints of the configured recipients (`x25519:…`, `ssh-ed25519:…`,
    /// `ssh-rsa:…`), or `["scrypt"]` in passphrase mode.
    pub fn fingerprints(&self) -> Vec<String> {
        if self.passphrase.is_some() {
            return vec![SCRYPT.to_owned()];
        }
        self.recipients.iter().map(|r| r.fingerprint()).collect()
    }

    /// One line for the start-up banner and `/health`.
    pub fn describe(&self) -> String {
        let identity = match self.identities.len() {
            0 => None,
            1 => Some(format!(
                "identity present ({})",
                self.identities[0].fingerprint
            )),
            n => Some(format!(
                "identity present ({n} keys: {})",
                self.identities
                    .iter()
                    .map(|k| k.fingerprint.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        if self.passphrase.is_some() {
            let mut s = "age: passphrase (scrypt; each set sealed to its own key, kept in its identity.age)".to_owned();
            if let Some(i) = identity {
                s.push_str("; ");
                s.push_str(&i);
            }
            return s;
        }
        if self.recipients.is_empty() {
            return format!(
                "age: decrypt-only ({}; no recipients: can restore, cannot back up)",
                identity.unwrap_or_default()
            );
        }
        let n = self.recipients.len();
        let head = format!(
            "age: {n} recipient{} ({})",
            if n == 1 { "" } else { "s" },
            self.fingerprints().join(", ")
        );
        match identity {
            Some(i) => format!("{head}; {i}"),
            None => format!(
                "{head}; write-only (no identity: can back up and checksum-verify, cannot decrypt)"
            ),
        }
    }

    /// Seals a probe to the recipients and opens it with the identities, so that a key pair
    /// that does not match fails at start-up rather than at the first restore. No-op when
    /// there is nothing to check against (write-only, decrypt-only, passphrase).
    pub fn probe(&self) -> Result<()> {
        if self.recipients.is_empty() || self.identities.is_empty() {
            return Ok(());
        }
        let sealer = SetSealer {
            recipients: self.recipients.clone().into(),
            fingerprints: self.fingerprints().into(),
        };
        let sealed = sealer.seal_bytes(b"dbkeeper age probe")?;
        let decryptor = age::Decryptor::new_buffered(&sealed[..])
            .map_err(|e| Error::engine("age", format!("probe: {}", describe_decrypt_error(&e))))?;
        match decryptor.decrypt(self.identities.iter().map(|k| k.identity.as_ref() as _)) {
            Ok(mut r) => {
                let mut out = Vec::new();
                r.read_to_end(&mut out)
                    .map_err(|e| Error::engine("age", format!("probe: {e}")))?;
                Ok(())
            }
            Err(DecryptError::NoMatchingKeys) => Err(Error::config(format!(
                "{IDENTITY_FILE} holds no key for any of the recipients {}",
                self.fingerprints().join(", ")
            ))),
            Err(e) => Err(Error::engine(
                "age",
                format!("probe: {}", describe_decrypt_error(&e)),
            )),
        }
    }

    /// Keys for a new set: a sealer, plus in passphrase mode the bytes of the set's
    /// `identity.age`.
    pub fn new_set(&self) -> Result<(SetSealer, Option<Vec<u8>>)> {
        let Some(passphrase) = &self.passphrase else {
            if self.recipients.is_empty() {
                return Err(Error::config(format!(
                    "{IDENTITY_FILE} is set without {RECIPIENTS}: this host can restore encrypted sets but not write them; set the recipients to back up"
                )));
            }
            let sealer = SetSealer {
                recipients: self.recipients.clone().into(),
                fingerprints: self.fingerprints().into(),
            };
            return Ok((sealer, None));
        };
        let key = x25519::Identity::generate();
        let public = key.to_public();
        let text = SecretString::from(format!(
            "# dbkeeper set key: decrypts this set's *.age files (age -d -i key.txt)\n# public key: {public}\n{}\n",
            key.to_string().expose_secret()
        ));
        let encryptor =
            age::Encryptor::with_user_passphrase(SecretString::from(passphrase.expose()));
        let mut out = Vec::with_capacity(512);
        let mut w = encryptor
            .wrap_output(&mut out)
            .map_err(|e| Error::engine("age", format!("sealing identity.age: {e}")))?;
        w.write_all(text.expose_secret().as_bytes())
            .and_then(|()| w.finish().map(|_| ()))
            .map_err(|e| Error::engine("age", format!("sealing identity.age: {e}")))?;
        let recipient = AnyRecipient::X25519(public);
        self.remember_set_key(
            &out,
            Key {
                fingerprint: recipient.fingerprint(),
                identity: Arc::new(key),
            },
        );
        let sealer = SetSealer {
            recipients: vec![recipient].into(),
            fingerprints: vec![SCRYPT.to_owned()].into(),
        };
        Ok((sealer, Some(out)))
    }

    /// Keys to open a set sealed to `sealed_to` (the fingerprints its manifest records).
    /// `identity_age` is the set's `identity.age`, present in passphrase mode. A missing or
    /// non-matching key is [`Error::Key`], naming the set and its recipients.
    pub fn open_set(
        &self,
        set_id: &str,
        sealed_to: &[String],
        identity_age: Option<&[u8]>,
    ) -> Result<SetOpener> {
        let by_passphrase = sealed_to.iter().any(|f| f == SCRYPT);
        let mut keys = Vec::new();
        if let (Some(bytes), Some(_)) = (identity_age, &self.passphrase) {
            keys.push(self.unseal_set_key(set_id, bytes)?);
        }
        keys.extend(self.identities.iter().cloned());
        if keys.is_empty() && by_passphrase && self.passphrase.is_some() {
            return Err(Error::corrupt(
                set_id,
                "is sealed with a passphrase but has no identity.age",
            ));
        }
        if keys.is_empty() {
            return Err(no_key_error(set_id, sealed_to));
        }
        // A passphrase-mode set records no key fingerprint, and a set key unsealed above is
        // right by construction; otherwise a fingerprint match tells before any file is read.
        let matched = by_passphrase
            || sealed_to.is_empty()
            || keys.iter().any(|k| sealed_to.contains(&k.fingerprint));
        if !matched {
            return Err(Error::Key(format!(
                "set {set_id} is encrypted to {}; {IDENTITY_FILE} holds no matching key",
                sealed_to.join(", ")
            )));
        }
        Ok(SetOpener {
            set_id: set_id.into(),
            no_key: no_key_error(set_id, sealed_to).to_string().into(),
            identities: keys.into_iter().map(|k| k.identity).collect(),
        })
    }

    fn remember_set_key(&self, identity_age: &[u8], key: Key) {
        let id = hex::encode(Sha256::digest(identity_age));
        // A poisoned cache only costs another scrypt run.
        if let Ok(mut cache) = self.set_keys.lock() {
            cache.insert(id, key);
        }
    }

    fn unseal_set_key(&self, set_id: &str, identity_age: &[u8]) -> Result<Key> {
        let id = hex::encode(Sha256::digest(identity_age));
        if let Some(k) = self.set_keys.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(k);
        }
        let Some(passphrase) = &self.passphrase else {
            return Err(no_key_error(set_id, &[SCRYPT.to_owned()]));
        };
        let corrupt = |m: String| Error::corrupt(set_id, format!("identity.age: {m}"));
        let decryptor = age::Decryptor::new_buffered(identity_age)
            .map_err(|e| corrupt(describe_decrypt_error(&e)))?;
        let scrypt = age::scrypt::Identity::new(SecretString::from(passphrase.expose()));
        let mut reader = match decryptor.decrypt(std::iter::once(&scrypt as _)) {
            Ok(r) => r,
            Err(DecryptError::NoMatchingKeys | DecryptError::DecryptionFailed) => {
                return Err(Error::Key(format!(
                    "set {set_id} is encrypted with a passphrase; the configured passphrase does not open its identity.age"
                )));
            }
            Err(e) => return Err(corrupt(describe_decrypt_error(&e))),
        };
        let mut plain = Vec::new();
        reader
            .read_to_end(&mut plain)
            .map_err(|e| corrupt(e.to_string()))?;
        let text = SecretString::from(
            String::from_utf8(plain)
                .map_err(|_| corrupt("does not hold an age identity".into()))?,
        );
        let mut keys = parse_identities(text.expose_secret(), "identity.age")
            .map_err(|_| corrupt("does not hold an age identity".into()))?;
        if keys.len() != 1 {
            return Err(corrupt("does not hold exactly one age identity".into()));
        }
        let key = keys.remove(0);
        self.remember_set_key(identity_age, key.clone());
        Ok(key)
    }
}

/// The error for an encrypted set that no configured key can open (or a host with no age
/// configuration at all).
pub fn no_key_error(set_id: &str, sealed_to: &[String]) -> Error {
    if sealed_to.iter().any(|f| f == SCRYPT) {
        return Error::Key(format!(
            "set {set_id} is encrypted with a passphrase (scrypt); set {PASSPHRASE_FILE}"
        ));
    }
    Error::Key(format!(
        "set {set_id} is encrypted to {}; set {IDENTITY_FILE}",
        sealed_to.join(", ")
    ))
}

/// Seals the files of one set. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct SetSealer {
    recipients: Arc<[AnyRecipient]>,
    fingerprints: Arc<[String]>,
}

impl fmt::Debug for SetSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetSealer")
            .field("sealed_to", &self.fingerprints)
            .finish()
    }
}

impl SetSealer {
    /// What the manifest records as the set's recipients.
    pub fn fingerprints(&self) -> Vec<String> {
        self.fingerprints.to_vec()
    }

    /// Starts an age file on `w`: the header is written now, the payload as it comes. The
    /// caller must call `finish()`, which writes the last chunk; without it the file is
    /// truncated and will not decrypt.
    pub fn seal<W: Write>(&self, w: W) -> io::Result<SealWriter<W>> {
        // Each file gets its own file key: a new header per call, never a shared stream.
        let encryptor = age::Encryptor::with_recipients(self.recipients.iter().map(|r| r.as_dyn()))
            .map_err(|e| io::Error::other(format!("age: {e}")))?;
        encryptor.wrap_output(w)
    }

    /// Seals a small file (the sealed manifest) in memory.
    pub fn seal_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() + 256);
        let mut w = self
            .seal(&mut out)
            .map_err(|e| Error::engine("age", format!("sealing: {e}")))?;
        w.write_all(data)
            .and_then(|()| w.finish().map(|_| ()))
            .map_err(|e| Error::engine("age", format!("sealing: {e}")))?;
        Ok(out)
    }
}

/// Opens the files of one set. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct SetOpener {
    set_id: Arc<str>,
    /// The message for a file that none of `identities` opens.
    no_key: Arc<str>,
    identities: Arc<[DynIdentity]>,
}

impl fmt::Debug for SetOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetOpener")
            .field("set", &self.set_id)
            .field("keys", &self.identities.len())
            .finish()
    }
}

impl SetOpener {
    /// Reads the age header and the payload nonce from `r` and unwraps the file key, leaving
    /// `r` at the first payload chunk. A wrong key or a corrupt header is an `io::Error`
    /// saying which; the payload is checked chunk by chunk as [`Payload`] opens it.
    ///
    /// The header, its recipients (X25519, ssh, scrypt) and its MAC stay age's business:
    /// `age` parses and authenticates it, and [`Capture`] keeps the file key it unwrapped.
    /// Only the payload is ours (see [`Payload`]).
    pub fn open_header<R: Read>(&self, r: &mut R) -> io::Result<Payload> {
        let capture = Capture {
            identities: &self.identities,
            file_key: RefCell::new(None),
        };
        let mut tail = Tail {
            inner: r,
            last: [0; 16],
            read: 0,
        };
        // `Decryptor::new` (not `new_buffered`) reads exactly the header and the nonce.
        let decryptor = age::Decryptor::new(&mut tail).map_err(|e| self.io_error(e))?;
        let stream = decryptor
            .decrypt(std::iter::once(&capture as &dyn age::Identity))
            .map_err(|e| self.io_error(e))?;
        drop(stream);
        let file_key = capture.file_key.into_inner();
        match file_key {
            Some(key) if tail.read >= 16 => Ok(Payload::new(&key, &tail.last)),
            _ => Err(io::Error::other(
                "age: the header opened without a file key",
            )),
        }
    }

    /// Opens a small sealed file (the sealed manifest) in memory.
    pub fn open_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        let opened = age::Decryptor::new_buffered(data)
            .and_then(|d| d.decrypt(self.identities.iter().map(|i| i.as_ref() as _)));
        let mut reader = match opened {
            Ok(r) => r,
            Err(DecryptError::NoMatchingKeys) => return Err(Error::Key(self.no_key.to_string())),
            Err(e) => return Err(Error::corrupt(&*self.set_id, describe_decrypt_error(&e))),
        };
        let mut out = Vec::new();
        reader
            .read_to_end(&mut out)
            .map_err(|e| Error::corrupt(&*self.set_id, format!("age payload: {e}")))?;
        Ok(out)
    }

    fn io_error(&self, e: DecryptError) -> io::Error {
        match e {
            DecryptError::NoMatchingKeys => {
                io::Error::new(io::ErrorKind::PermissionDenied, self.no_key.to_string())
            }
            DecryptError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                io::Error::new(io::ErrorKind::UnexpectedEof, "age header is truncated")
            }
            DecryptError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, describe_decrypt_error(&other)),
        }
    }
}

/// age's own messages go through its localizer; ours stay one fixed line each.
fn describe_decrypt_error(e: &DecryptError) -> String {
    match e {
        DecryptError::DecryptionFailed => "age payload does not authenticate (corrupt)".into(),
        DecryptError::ExcessiveWork { required, target } => {
            format!("age scrypt work factor 2^{required} exceeds this host's limit 2^{target}")
        }
        DecryptError::InvalidHeader => "age header is invalid (corrupt, or not an age file)".into(),
        DecryptError::InvalidMac => "age header does not authenticate (corrupt)".into(),
        DecryptError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "age header is truncated".into()
        }
        DecryptError::Io(e) => format!("age: {e}"),
        DecryptError::KeyDecryptionFailed => "age key could not be unwrapped".into(),
        DecryptError::NoMatchingKeys => "no configured age key opens it".into(),
        DecryptError::UnknownFormat => "not an age v1 file".into(),
        #[allow(unreachable_patterns)]
        _ => "age: cannot decrypt".into(),
    }
}

/// Passes the stanzas to the configured identities, as age would, and keeps the file key
/// the first matching one unwrapped. age still authenticates the header with that key: a
/// key captured from a header whose MAC fails is never used, since `decrypt` fails then.
struct Capture<'a> {
    identities: &'a [DynIdentity],
    file_key: RefCell<Option<FileKey>>,
}

impl age::Identity for Capture<'_> {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<std::result::Result<FileKey, DecryptError>> {
        self.unwrap_stanzas(std::slice::from_ref(stanza))
    }

    fn unwrap_stanzas(
        &self,
        stanzas: &[Stanza],
    ) -> Option<std::result::Result<FileKey, DecryptError>> {
        let found = self
            .identities
            .iter()
            .find_map(|i| i.unwrap_stanzas(stanzas));
        if let Some(Ok(key)) = &found {
            let copy = FileKey::new(Box::new(*key.expose_secret()));
            *self.file_key.borrow_mut() = Some(copy);
        }
        found
    }
}

/// Remembers the last 16 bytes read through it: once age has read the header and the
/// payload nonce after it, they are the nonce (which age keeps private).
struct Tail<'a, R> {
    inner: &'a mut R,
    last: [u8; 16],
    read: u64,
}

impl<R: Read> Read for Tail<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n >= 16 {
            self.last.copy_from_slice(&buf[n - 16..n]);
        } else {
            self.last.rotate_left(n);
            self.last[16 - n..].copy_from_slice(&buf[..n]);
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// The payload of one age file, opened chunk by chunk.
///
/// Written by hand after the age v1 spec rather than through the crate's `StreamReader`:
/// the crate's ChaCha20-Poly1305 is generic Rust whose AVX2 helpers stay un-inlined in our
/// size-optimised LTO build (half the speed of `age -d`), while ring's is assembly at any
/// opt-level. The header is still age's (see [`SetOpener::open_header`]).
pub struct Payload {
    key: LessSafeKey,
    /// The next chunk's index: the first 11 bytes of its nonce, big-endian.
    counter: u64,
    /// The final chunk was opened: nothing may follow.
    ended: bool,
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("counter", &self.counter)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Payload {
    /// payload key = HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload").
    fn new(file_key: &FileKey, nonce: &[u8; 16]) -> Payload {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, nonce).extract(file_key.expose_secret());
        let okm = prk
            .expand(&[b"payload"], &aead::CHACHA20_POLY1305)
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        Payload {
            key: LessSafeKey::new(UnboundKey::from(okm)),
            counter: 0,
            ended: false,
        }
    }

    /// Opens the next sealed chunks of the payload in place: `buf` holds whole chunks of
    /// [`SEALED_CHUNK`] bytes, except that its last one may be shorter when `last` says the
    /// payload ends with it. That chunk must carry the final flag and every other chunk
    /// must not, so a payload cut at a chunk boundary, one with a chunk after the final one,
    /// or one whose final flag sits on an earlier chunk fails to authenticate. Each chunk's
    /// plaintext is then at [`plaintext`]`(buf.len(), start)`. On error the buffer's
    /// content is unspecified and the payload is not to be read further.
    pub fn open_in_place(&mut self, buf: &mut [u8], last: bool) -> io::Result<()> {
        let bad =
            |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("age payload {why}"));
        if self.ended {
            return Err(bad("goes on after its final chunk (corrupt)"));
        }
        if buf.is_empty() {
            return if last {
                Err(bad("is truncated (no final chunk)"))
            } else {
                Ok(())
            };
        }
        let chunks = buf.len().div_ceil(SEALED_CHUNK);
        for (i, chunk) in buf.chunks_mut(SEALED_CHUNK).enumerate() {
            let fin = last && i + 1 == chunks;
            if chunk.len() < SEALED_CHUNK && !fin {
                return Err(bad("is truncated (short chunk)"));
            }
            if chunk.len() < TAG {
                return Err(bad("is truncated (partial tag)"));
            }
            // Only the payload of an empty file ends with an empty chunk.
            if fin && chunk.len() == TAG && self.counter > 0 {
                return Err(bad("ends with an empty chunk (corrupt)"));
            }
            let mut nonce = [0u8; 12];
            nonce[3..11].copy_from_slice(&self.counter.to_be_bytes());
            nonce[11] = u8::from(fin);
            let (text, tag) = chunk.split_at_mut(chunk.len() - TAG);
            let tag = Tag::try_from(&tag[..]).map_err(|_| bad("has a malformed tag"))?;
            self.key
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    tag,
                    text,
                    0..,
                )
                .map_err(|_| bad("does not authenticate (corrupt or truncated)"))?;
            self.counter += 1;
        }
        self.ended = last;
        Ok(())
    }
}

/// Where the plaintext of the chunk starting at `start` lies in a buffer of `len` bytes of
/// sealed chunks once [`Payload::open_in_place`] has opened it.
pub fn plaintext(len: usize, start: usize) -> std::ops::Range<usize> {
    start
        ..(start + SEALED_CHUNK)
            .min(len)
            .saturating_sub(TAG)
            .max(start)
}

/// Reads a key file. Held as a secret so an identity file's text is wiped when dropped.
fn read_text(what: &str, path: &str) -> Result<SecretString> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::config(format!("{what}: cannot read: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::config(format!("{what}: is not a text file of age keys")))?;
    Ok(SecretString::from(text))
}

/// Parses recipients: one per line, `#` comments and blank lines skipped (age's
/// recipients-file format). In the variable (`inline`), a line may also hold several
/// comma- or space-separated keys; an ssh key, whose text has spaces, must stand alone in
/// its line or comma-separated field. Errors name the line, never the text: a private key
/// pasted here by mistake must not reach a log.
fn parse_recipients(text: &str, what: &str, inline: bool) -> Result<Vec<AnyRecipient>> {
    let mut out: Vec<AnyRecipient> = Vec::new();
    let mut seen = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: &str| Error::config(format!("{what}: line {}: {m}", i + 1));
        let fields: Vec<&str> = if inline {
            line.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect()
        } else {
            vec![line]
        };
        for field in fields {
            let first = field.split_whitespace().next().unwrap_or_default();
            let entries: Vec<&str> = if is_ssh_type(first) || !inline {
                vec![field]
            } else {
                field.split_whitespace().collect()
            };
            for entry in entries {
                let r = parse_recipient(entry).map_err(|m| at(&m))?;
                let fp = r.fingerprint();
                if !seen.contains(&fp) {
                    seen.push(fp);
                    out.push(r);
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::config(format!("{what}: holds no recipient")));
    }
    Ok(out)
}

fn is_ssh_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-") || word.starts_with("sk-")
}

/// One recipient; the error says what is wrong without repeating the input.
fn parse_recipient(s: &str) -> std::result::Result<AnyRecipient, String> {
    let upper = s.to_ascii_uppercase();
    if upper.starts_with("AGE-SECRET-KEY-")
        || upper.starts_with("AGE-PLUGIN-")
        || s.starts_with("-----BEGIN")
    {
        return Err(format!(
            "holds a private key, not a recipient: put public keys (age1…) here and the private key in {IDENTITY_FILE}"
        ));
    }
    let first = s.split_whitespace().next().unwrap_or_default();
    if is_ssh_type(first) {
        return match ssh::Recipient::from_str(s) {
            Ok(r) => Ok(AnyRecipient::Ssh(r)),
            Err(ssh::ParseRecipientKeyError::RsaModulusTooSmall) => {
                Err("ssh-rsa key is shorter than 2048 bits, which age refuses".into())
            }
            Err(ssh::ParseRecipientKeyError::RsaModulusTooLarge) => {
                Err("ssh-rsa key is longer than age supports".into())
            }
            Err(ssh::ParseRecipientKeyError::Unsupported(t)) => Err(format!(
                "ssh key type {} is not supported (use ssh-ed25519, ssh-rsa or an age1… key)",
                printable(&t)
            )),
            Err(_) => Err(format!("not a valid {} public key", printable(first))),
        };
    }
    if s.len() > 4 && s[..4].eq_ignore_ascii_case("age1") {
        return match x25519::Recipient::from_str(s) {
            Ok(r) => Ok(AnyRecipient::X25519(r)),
            // age1<plugin>1… and age1pq1… parse as bech32 with another prefix.
            Err("incorrect HRP") => Err(
                "not an X25519 age1… key (plugin and post-quantum recipients are not supported)"
                    .into(),
            ),
            Err(why) => Err(format!("not a valid age1… public key ({why})")),
        };
    }
    Err("not an age recipient (expected age1…, ssh-ed25519 … or ssh-rsa …)".into())
}

/// A key type name from the input, shown only if it looks like one.
fn printable(t: &str) -> &str {
    if t.len() <= 40
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-@._".contains(&b))
    {
        t
    } else {
        "(unprintable)"
    }
}

/// Parses an identity file: age's format (`AGE-SECRET-KEY-1…` lines, `#` comments, blank
/// lines), or a whole unencrypted OpenSSH/PEM private key. Errors name the line, never its
/// text.
fn parse_identities(text: &str, what: &str) -> Result<Vec<Key>> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    if first.is_some_and(|l| l.starts_with("-----BEGIN")) {
        return parse_ssh_identity(text, what).map(|k| vec![k]);
    }
    let mut keys: Vec<Key> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: &str| Error::config(format!("{what}: line {}: {m}", i + 1));
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("AGE-SECRET-KEY-1") {
            let identity = x25519::Identity::from_str(line)
                .map_err(|why| at(&format!("not a valid AGE-SECRET-KEY-1… identity ({why})")))?;
            let fingerprint = AnyRecipient::X25519(identity.to_public()).fingerprint();
            if !keys.iter().any(|k| k.fingerprint == fingerprint) {
                keys.push(Key {
                    identity: Arc::new(identity),
                    fingerprint,
                });
            }
        } else if upper.starts_with("AGE-PLUGIN-") {
            return Err(at("plugin identities are not supported"));
        } else if line.starts_with("age1") || is_ssh_type(line) {
            return Err(at(&format!(
                "holds a public key; this file needs the private key (AGE-SECRET-KEY-1…), and public keys go in {RECIPIENTS}"
            )));
        } else {
            return Err(at(
                "not an age identity (expected AGE-SECRET-KEY-1… lines or an OpenSSH private key)",
            ));
        }
    }
    if keys.is_empty() {
        return Err(Error::config(format!("{what}: holds no identity")));
    }
    Ok(keys)
}

fn parse_ssh_identity(text: &str, what: &str) -> Result<Key> {
    let identity = ssh::Identity::from_buffer(text.as_bytes(), None)
        .map_err(|_| Error::config(format!("{what}: is not a valid ssh private key")))?;
    let locked = || {
        Error::config(format!(
            "{what}: is a passphrase-protected ssh key, which cannot be unlocked unattended; use an age identity (age-keygen) or an unencrypted key"
        ))
    };
    match &identity {
        ssh::Identity::Unencrypted(_) => {}
        ssh::Identity::Encrypted(_)
        | ssh::Identity::Unsupported(
            ssh::UnsupportedKey::EncryptedPem | ssh::UnsupportedKey::EncryptedSsh(_),
        ) => return Err(locked()),
        ssh::Identity::Unsupported(
            ssh::UnsupportedKey::Type(t) | ssh::UnsupportedKey::Hardware(t),
        ) => {
            return Err(Error::config(format!(
                "{what}: ssh key type {} is not supported (use ssh-ed25519, ssh-rsa or an age identity)",
                printable(t)
            )));
        }
    }
    let public = ssh::Recipient::try_from(identity.clone()).map_err(|_| {
        Error::config(format!(
            "{what}: ssh key is not usable by age (type or size)"
        ))
    })?;
    Ok(Key {
        fingerprint: ssh_fingerprint(&public),
        identity: Arc::new(identity),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::env_of;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// age's own test vectors (rage `src/ssh/*.rs`): public, never used outside tests.
    const SSH_ED25519_SK: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACB7Ci6nqZYaVvrjm8+XbzII89TsXzP111AflR7WeorBjQAAAJCfEwtqnxML
agAAAAtzc2gtZWQyNTUxOQAAACB7Ci6nqZYaVvrjm8+XbzII89TsXzP111AflR7WeorBjQ
AAAEADBJvjZT8X6JRJI8xVq/1aU8nMVgOtVnmdwqWwrSlXG3sKLqeplhpW+uObz5dvMgjz
1OxfM/XXUB+VHtZ6isGNAAAADHN0cjRkQGNhcmJvbgE=
-----END OPENSSH PRIVATE KEY-----
";
    const SSH_ED25519_PK: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN alice@rust";
    /// The same key, encrypted with aes256-ctr.
    const SSH_ED25519_SK_LOCKED: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABBSs0SUhQ
958xWERf6ibyf2AAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uOb
z5dvMgjz1OxfM/XXUB+VHtZ6isGNAAAAkLvH9UsJa+ulewsZT2YtEkme1y9UZKI/vUbTms
LVqWdLprBQIm3IClfGso6IPW7+imkwYRHPKYfBYGYuexzO8b+LRiZU5/lDQmsvZA3asNxp
KjW7kUOJnI8dAeaqJa18P7XkAuzcuZmVoCTurqEOSeb5Ww9Nq0csB0zkF22/PeWy3+BZW5
hDsL1OfQl4WbakZQ==
-----END OPENSSH PRIVATE KEY-----
";
    const SSH_RSA_SK: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAxO5yF0xjbmkQTfbaCP8DQC7kHnPJr5bdIie6Nzmg9lL6Chye
0vK5iJ+BYkA1Hnf1WnNzoVIm3otZPkwZptertkY95JYFmTiA4IvHeL1yiOTd2AYc
a947EPpM9XPomeM/7U7c99OvuCuOl1YlTFsMsoPY/NiZ+NZjgMvb3XgyH0OXy3mh
qp+SsJU+tRjZGfqM1iv2TZUCJTQnKF8YSVCyLPV67XM1slQQHmtZ5Q6NFhzg3j8a
CY5rDR66UF5+Zn/TvN8bNdKn01I50VLePI0ZnnRcuLXK2t0Bpkk0NymZ3vsF10m9
HCKVyxr2Y0Ejx4BtYXOK97gaYks73rBi7+/VywIDAQABAoIBADGsf8TWtOH9yGoS
ES9hu90ttsbjqAUNhdv+r18Mv0hC5+UzEPDe3uPScB1rWrrDwXS+WHVhtoI+HhWz
tmi6UArbLvOA0Aq1EPUS7Q7Mop5bNIYwDG09EiMXL+BeC1b91nsygFRW5iULf502
0pOvB8XjshEdRcFZuqGbSmtTzTjLLxYS/aboBtZLHrH4cRlFMpHWCSuJng8Psahp
SnJbkjL7fHG81dlH+M3qm5EwdDJ1UmNkBfoSfGRs2pupk2cSJaL+SPkvNX+6Xyoy
yvfnbJzKUTcV6rf+0S0P0yrWK3zRK9maPJ1N60lFui9LvFsunCLkSAluGKiMwEjb
fm40F4kCgYEA+QzIeIGMwnaOQdAW4oc7hX5MgRPXJ836iALy56BCkZpZMjZ+VKpk
8P4E1HrEywpgqHMox08hfCTGX3Ph6fFIlS1/mkLojcgkrqmg1IrRvh8vvaZqzaAf
GKEhxxRta9Pvm44E2nUY97iCKzE3Vfh+FIyQLRuc+0COu49Me4HPtBUCgYEAym1T
vNZKPfC/eTMh+MbWMsQArOePdoHQyRC38zeWrLaDFOUVzwzEvCQ0IzSs0PnLWkZ4
xx60wBg5ZdU4iH4cnOYgjavQrbRFrCmZ1KDUm2+NAMw3avcLQqu41jqzyAlkktUL
fZzyqHIBmKYLqut5GslkGnQVg6hB4psutHhiel8CgYA3yy9WH9/C6QBxqgaWdSlW
fLby69j1p+WKdu6oCXUgXW3CHActPIckniPC3kYcHpUM58+o5wdfYnW2iKWB3XYf
RXQiwP6MVNwy7PmE5Byc9Sui1xdyPX75648/pEnnMDGrraNUtYsEZCd1Oa9l6SeF
vv/Fuzvt5caUKkQ+HxTDCQKBgFhqUiXr7zeIvQkiFVeE+a/ovmbHKXlYkCoSPFZm
VFCR00VAHjt2V0PaCE/MRSNtx61hlIVcWxSAQCnDbNLpSnQZa+SVRCtqzve4n/Eo
YlSV75+GkzoMN4XiXXRs5XOc7qnXlhJCiBac3Segdv4rpZTWm/uV8oOz7TseDtNS
tai/AoGAC0CiIJAzmmXscXNS/stLrL9bb3Yb+VZi9zN7Cb/w7B0IJ35N5UOFmKWA
QIGpMU4gh6p52S1eLttpIf2+39rEDzo8pY6BVmEp3fKN3jWmGS4mJQ31tWefupC+
fGNu+wyKxPnSU3svsuvrOdwwDKvfqCNyYK878qKAAaBqbGT1NJ8=
-----END RSA PRIVATE KEY-----
";
    const SSH_RSA_PK: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDE7nIXTGNuaRBN9toI/wNALuQec8mvlt0iJ7o3OaD2UvoKHJ7S8rmIn4FiQDUed/Vac3OhUibei1k+TBmm16u2Rj3klgWZOIDgi8d4vXKI5N3YBhxr3jsQ+kz1c+iZ4z/tTtz306+4K46XViVMWwyyg9j82Jn41mOAy9vdeDIfQ5fLeaGqn5KwlT61GNkZ+ozWK/ZNlQIlNCcoXxhJULIs9XrtczWyVBAea1nlDo0WHODePxoJjmsNHrpQXn5mf9O83xs10qfTUjnRUt48jRmedFy4tcra3QGmSTQ3KZne+wXXSb0cIpXLGvZjQSPHgG1hc4r3uBpiSzvesGLv79XL alice@rust";

    fn crypto(pairs: &[(&str, &str)]) -> Crypto {
        Crypto::from_env(&env_of(pairs)).unwrap().unwrap()
    }

    fn config_err(pairs: &[(&str, &str)]) -> String {
        match Crypto::from_env(&env_of(pairs)) {
            Err(e @ Error::Config(_)) => e.to_string(),
            Err(e) => panic!("not a config error: {e}"),
            Ok(_) => panic!("accepted {pairs:?}"),
        }
    }

    struct Pair {
        secret: String,
        public: String,
    }

    fn keypair() -> Pair {
        let k = x25519::Identity::generate();
        Pair {
            secret: k.to_string().expose_secret().to_owned(),
            public: k.to_public().to_string(),
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    }

    /// Bytes spanning several 64 KiB age chunks, not a multiple of the chunk size.
    pub(crate) fn sample(len: usize) -> Vec<u8> {
        crate::testutil::noise(len)
    }

    pub(crate) fn seal(sealer: &SetSealer, data: &[u8]) -> Vec<u8> {
        let mut w = sealer.seal(Vec::new()).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    /// Our payload decryption over a whole file in memory.
    fn open(opener: &SetOpener, sealed: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = sealed;
        let mut payload = opener.open_header(&mut r)?;
        let mut buf = r.to_vec();
        payload.open_in_place(&mut buf, true)?;
        Ok(opened(&buf))
    }

    /// The plaintext of a buffer of chunks opened in place.
    fn opened(buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len());
        for start in (0..buf.len()).step_by(SEALED_CHUNK) {
            out.extend_from_slice(&buf[plaintext(buf.len(), start)]);
        }
        out
    }

    /// The age crate's own `StreamReader`: the reference our decryption must match.
    fn crate_open(identity: &dyn age::Identity, sealed: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        age::Decryptor::new(sealed)
            .and_then(|d| d.decrypt(std::iter::once(identity)))
            .map_err(|e| io::Error::other(e.to_string()))?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    /// The stock `age` CLI, or `None` (skip) outside CI when it is not installed.
    fn age_cli() -> Option<&'static str> {
        let ok = Command::new("age")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some("age");
        }
        if std::env::var_os("CI").is_some() {
            panic!("the age CLI is required in CI (apt-get install -y age)");
        }
        eprintln!("skipped: the age CLI is not installed (apt-get install -y age)");
        None
    }

    fn run(cmd: &mut Command) -> Vec<u8> {
        let out = cmd.stderr(Stdio::piped()).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn x25519_round_trip_each_identity_decrypts() {
        let (a, b) = (keypair(), keypair());
        let dir = tempfile::tempdir().unwrap();
        let recipients = format!("{}, {}", a.public, b.public);
        let data = sample(300_000);
        let sealer = crypto(&[(RECIPIENTS, &recipients)]).new_set().unwrap().0;
        assert_eq!(sealer.fingerprints().len(), 2);
        let sealed = seal(&sealer, &data);
        let small = sealer.seal_bytes(b"manifest").unwrap();
        for key in [&a, &b] {
            let file = write(dir.path(), "id.txt", &format!("# test\n\n{}\n", key.secret));
            let c = crypto(&[(IDENTITY_FILE, &file)]);
            assert!(c.can_decrypt() && !c.can_encrypt());
            let opener = c.open_set("s", &sealer.fingerprints(), None).unwrap();
            assert_eq!(open(&opener, &sealed).unwrap(), data);
            assert_eq!(opener.open_bytes(&small).unwrap(), b"manifest");
        }
    }

    #[test]
    fn ssh_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for (public, secret, kind) in [
            (SSH_ED25519_PK, SSH_ED25519_SK, "ssh-ed25519:"),
            (SSH_RSA_PK, SSH_RSA_SK, "ssh-rsa:"),
        ] {
            let file = write(dir.path(), "id_test", secret);
            let c = crypto(&[(RECIPIENTS, public), (IDENTITY_FILE, &file)]);
            assert!(
                c.fingerprints()[0].starts_with(kind),
                "{:?}",
                c.fingerprints()
            );
            c.probe().unwrap();
            let (sealer, identity_age) = c.new_set().unwrap();
            assert!(identity_age.is_none());
            let opener = c.open_set("s", &sealer.fingerprints(), None).unwrap();
            let data = sample(70_000);
            assert_eq!(open(&opener, &seal(&sealer, &data)).unwrap(), data);
        }
    }

    #[test]
    fn fingerprints_have_the_documented_form() {
        let a = keypair();
        let c = crypto(&[(RECIPIENTS, &format!("{}\n{}", a.public, SSH_ED25519_PK))]);
        let fps = c.fingerprints();
        assert_eq!(fps.len(), 2);
        let expected = hex::encode(Sha256::digest(a.public.as_bytes()));
        assert_eq!(fps[0], format!("x25519:{}", &expected[..16]));
        // The comment is not part of the key.
        let canonical = SSH_ED25519_PK.rsplit_once(' ').unwrap().0;
        let expected = hex::encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(fps[1], format!("ssh-ed25519:{}", &expected[..16]));
        let other_comment = SSH_ED25519_PK.replace("alice@rust", "bob@elsewhere");
        assert_eq!(
            crypto(&[(RECIPIENTS, &other_comment)]).fingerprints()[0],
            fps[1]
        );
        // Duplicates collapse.
        let twice = format!("{0} {0},{0}", a.public);
        assert_eq!(crypto(&[(RECIPIENTS, &twice)]).fingerprints().len(), 1);
    }

    #[test]
    fn recipients_file_format_and_describe() {
        let (a, b) = (keypair(), keypair());
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "recipients.txt",
            &format!(
                "# ops team\n{}\n\n  {SSH_ED25519_PK}\n# offline\n{}\n",
                a.public, b.public
            ),
        );
        let c = crypto(&[(RECIPIENTS_FILE, &file)]);
        assert_eq!(c.fingerprints().len(), 3);
        let d = c.describe();
        assert!(d.starts_with("age: 3 recipients (x25519:"), "{d}");
        assert!(
            d.ends_with(
                "write-only (no identity: can back up and checksum-verify, cannot decrypt)"
            ),
            "{d}"
        );
        assert!(!c.can_decrypt() && c.can_encrypt());
        c.probe().unwrap();
        let key = write(dir.path(), "key.txt", &a.secret);
        let c = crypto(&[(RECIPIENTS_FILE, &file), (IDENTITY_FILE, &key)]);
        assert!(
            c.describe().contains("; identity present (x25519:"),
            "{}",
            c.describe()
        );
        c.probe().unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains(&a.secret) && !debug.contains("AGE-SECRET"),
            "{debug}"
        );
        assert!(
            Crypto::from_env(&env_of(&[("OTHER", "x")]))
                .unwrap()
                .is_none(),
            "no age variable: no Crypto"
        );
    }

    #[test]
    fn passphrase_mode_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pass = write(dir.path(), "pass", "correct horse battery staple\n");
        let c = crypto(&[(PASSPHRASE_FILE, &pass)]);
        assert!(c.can_encrypt() && c.can_decrypt());
        assert_eq!(c.fingerprints(), ["scrypt"]);
        assert!(
            c.describe().starts_with("age: passphrase"),
            "{}",
            c.describe()
        );
        c.probe().unwrap();
        let (sealer, identity_age) = c.new_set().unwrap();
        let identity_age = identity_age.expect("passphrase mode stores identity.age");
        assert_eq!(sealer.fingerprints(), ["scrypt"]);
        let data = sample(200_000);
        let sealed = seal(&sealer, &data);
        // A fresh Crypto has no cached set key: this runs the scrypt decryptor.
        let fresh = crypto(&[(PASSPHRASE, "correct horse battery staple")]);
        let opener = fresh
            .open_set("s", &sealer.fingerprints(), Some(&identity_age))
            .unwrap();
        assert_eq!(open(&opener, &sealed).unwrap(), data);
        // The unsealed identity.age is an ordinary identity file.
        let plain = age::decrypt(
            &age::scrypt::Identity::new(SecretString::from("correct horse battery staple")),
            &identity_age,
        )
        .unwrap();
        let key = write(dir.path(), "key.txt", std::str::from_utf8(&plain).unwrap());
        let recovered = crypto(&[(IDENTITY_FILE, &key)]);
        let opener = recovered
            .open_set("s", &sealer.fingerprints(), Some(&identity_age))
            .unwrap();
        assert_eq!(open(&opener, &sealed).unwrap(), data);

        let wrong = crypto(&[(PASSPHRASE, "wrong")]);
        let err = wrong
            .open_set(
                "2026-01-01_00-00-00",
                &sealer.fingerprints(),
                Some(&identity_age),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Key(_)), "{err}");
        assert_eq!(err.exit_code().code(), 1);
        assert!(
            err.to_string()
                .contains("passphrase does not open its identity.age"),
            "{err}"
        );
        let err = crypto(&[(
            IDENTITY_FILE,
            &write(dir.path(), "other", &keypair().secret),
        )])
        .open_set("s", &sealer.fingerprints(), Some(&identity_age))
        .and_then(|o| o.open_bytes(&sealer.seal_bytes(b"m").unwrap()))
        .unwrap_err();
        assert!(
            err.to_string().contains("set DBKEEPER_AGE_PASSPHRASE_FILE"),
            "{err}"
        );
    }

    #[test]
    fn cli_opens_what_we_seal() {
        let Some(age) = age_cli() else { return };
        let dir = tempfile::tempdir().unwrap();
        let a = keypair();
        let data = sample(150_000);
        for (recipient, secret) in [
            (a.public.as_str(), a.secret.as_str()),
            (SSH_ED25519_PK, SSH_ED25519_SK),
        ] {
            let sealer = crypto(&[(RECIPIENTS, recipient)]).new_set().unwrap().0;
            let sealed = write_bytes(dir.path(), "f.zst.age", &seal(&sealer, &data));
            let key = write(dir.path(), "key", secret);
            let out = run(Command::new(age).args(["-d", "-i", &key, &sealed]));
            assert!(out == data, "age -d differs for {recipient}");
        }
    }

    fn write_bytes(dir: &Path, name: &str, data: &[u8]) -> String {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_owned()
    }

    #[test]
    fn we_open_what_cli_seals() {
        let Some(age) = age_cli() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (keypair(), keypair());
        let data = sample(150_000);
        let plain = write_bytes(dir.path(), "plain", &data);
        let sealed = dir.path().join("f.age");
        run(Command::new(age)
            .args(["-r", &a.public, "-r", &b.public, "-R"])
            .arg(write(dir.path(), "ssh.pub", SSH_ED25519_PK))
            .arg("-o")
            .arg(&sealed)
            .arg(&plain));
        let sealed = std::fs::read(&sealed).unwrap();
        let sealed_to: Vec<String> =
            crypto(&[(RECIPIENTS, &format!("{} {}", a.public, b.public))]).fingerprints();
        for secret in [&b.secret, SSH_ED25519_SK] {
            let key = write(dir.path(), "key", secret);
            let c = crypto(&[(IDENTITY_FILE, &key)]);
            let opener = c.open_set("s", &[], None).unwrap();
            assert_eq!(open(&opener, &sealed).unwrap(), data);
        }
        let key = write(dir.path(), "key", &a.secret);
        let opener = crypto(&[(IDENTITY_FILE, &key)])
            .open_set("s", &sealed_to, None)
            .unwrap();
        assert_eq!(opener.open_bytes(&sealed).unwrap(), data);
    }

    /// Stock `age -d identity.age` reads the passphrase from the terminal, so it runs under
    /// `script`'s pty; the key it prints then opens the set's files with `age -d -i`.
    #[test]
    fn cli_recovers_a_passphrase_set() {
        let Some(age) = age_cli() else { return };
        let has_script = Command::new("script")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_script {
            assert!(
                std::env::var_os("CI").is_none(),
                "script (util-linux) is required in CI"
            );
            eprintln!("skipped: script (util-linux) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let c = crypto(&[(PASSPHRASE, "tr0ub4dor&3")]);
        let (sealer, identity_age) = c.new_set().unwrap();
        write_bytes(dir.path(), "identity.age", &identity_age.unwrap());
        let data = sample(100_000);
        write_bytes(dir.path(), "f.zst.age", &seal(&sealer, &data));
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!("{age} -d -o key.txt identity.age"),
                "/dev/null",
            ])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"tr0ub4dor&3\n")
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "age -d identity.age under a pty failed"
        );
        let out = run(Command::new(age)
            .args(["-d", "-i", "key.txt", "f.zst.age"])
            .current_dir(dir.path()));
        assert!(out == data, "age -d -i key.txt differs");
    }

    #[test]
    fn probe_rejects_a_mismatched_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = (keypair(), keypair(), keypair());
        let key = write(dir.path(), "key", &other.secret);
        let c = crypto(&[
            (RECIPIENTS, &format!("{}\n{}", a.public, b.public)),
            (IDENTITY_FILE, &key),
        ]);
        let err = c.probe().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "configuration: DBKEEPER_AGE_IDENTITY_FILE holds no key for any of the recipients {}",
                c.fingerprints().join(", ")
            )
        );
        // One matching key of several recipients is enough.
        let key = write(
            dir.path(),
            "key",
            &format!("{}\n{}", other.secret, b.secret),
        );
        crypto(&[
            (RECIPIENTS, &format!("{}\n{}", a.public, b.public)),
            (IDENTITY_FILE, &key),
        ])
        .probe()
        .unwrap();
    }

    #[test]
    fn wrong_or_missing_identity_names_the_set_and_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = (keypair(), keypair(), keypair());
        let sealer = crypto(&[(RECIPIENTS, &format!("{} {}", a.public, b.public))])
            .new_set()
            .unwrap()
            .0;
        let fps = sealer.fingerprints();
        let key = write(dir.path(), "key", &other.secret);
        let err = crypto(&[(IDENTITY_FILE, &key)])
            .open_set("2026-11-23_02-00-00", &fps, None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "set 2026-11-23_02-00-00 is encrypted to {}, {}; DBKEEPER_AGE_IDENTITY_FILE holds no matching key",
                fps[0], fps[1]
            )
        );
        assert_eq!(err.exit_code().code(), 1);
        let err = no_key_error("2026-11-23_02-00-00", &fps);
        assert_eq!(
            err.to_string(),
            format!(
                "set 2026-11-23_02-00-00 is encrypted to {}, {}; set DBKEEPER_AGE_IDENTITY_FILE",
                fps[0], fps[1]
            )
        );
        assert_eq!(err.exit_code().code(), 1);
        // A write-only host meets the set: same message as no configuration at all.
        let err = crypto(&[(RECIPIENTS, &a.public)])
            .open_set("x", &fps, None)
            .unwrap_err();
        assert!(
            err.to_string().ends_with("set DBKEEPER_AGE_IDENTITY_FILE"),
            "{err}"
        );
        // A file whose manifest lied about its recipients still fails as a key error, in one line.
        let opener = crypto(&[(IDENTITY_FILE, &key)])
            .open_set("x", &[], None)
            .unwrap();
        let sealed = seal(&sealer, b"data");
        let err = opener.open_header(&mut &sealed[..]).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(!err.to_string().contains('\n'));
        assert!(matches!(opener.open_bytes(&sealed), Err(Error::Key(_))));
    }

    #[test]
    fn malformed_keys_are_config_errors_without_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let a = keypair();
        let mut typo = a.secret.clone();
        typo.replace_range(20..21, if &typo[20..21] == "Q" { "P" } else { "Q" });
        // Another last character (a key may end in `x` already).
        let swap = if a.public.ends_with('x') { "y" } else { "x" };
        let bad_public = format!("{}{swap}", &a.public[..a.public.len() - 1]);
        let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
            (vec![(RECIPIENTS, format!("{}\n{bad_public}", a.public))], "DBKEEPER_AGE_RECIPIENTS: line 2: not a valid age1"),
            (vec![(RECIPIENTS, format!("{}, {}", a.public, a.secret))], "line 1: holds a private key"),
            (vec![(RECIPIENTS, "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHFliOyIZs1gxGF3fmDxFykQhE88wy6AKDGFBfn0R6ZuvRmENABZQa9+pj9hMki+LX0qDJbmHTiWDbYv/cmFt/Q=".into())], "ecdsa-sha2-nistp256 is not supported"),
            (vec![(RECIPIENTS, "hello".into())], "line 1: not an age recipient"),
            (vec![(RECIPIENTS, "# only a comment\n".into())], "holds no recipient"),
            (vec![(RECIPIENTS_FILE, write(dir.path(), "r", &format!("# x\n\n{}", a.secret)))], "line 3: holds a private key"),
            (vec![(RECIPIENTS_FILE, "/no/such/file".into())], "DBKEEPER_AGE_RECIPIENTS_FILE=/no/such/file: cannot read"),
            (vec![(IDENTITY_FILE, write(dir.path(), "i1", &format!("# k\n{}\n{typo}\n", keypair().secret)))], "DBKEEPER_AGE_IDENTITY_FILE="),
            (vec![(IDENTITY_FILE, write(dir.path(), "i2", &format!("\n{}\n", a.public)))], "line 2: holds a public key"),
            (vec![(IDENTITY_FILE, write(dir.path(), "i3", &format!("{}garbage", a.secret)))], "line 1: not a valid AGE-SECRET-KEY-1"),
            (vec![(IDENTITY_FILE, write(dir.path(), "i4", "# nothing\n"))], "holds no identity"),
            (vec![(IDENTITY_FILE, write(dir.path(), "i5", SSH_ED25519_SK_LOCKED))], "passphrase-protected ssh key"),
            (vec![(IDENTITY_FILE, write(dir.path(), "i6", &SSH_ED25519_SK.replace("b3Bl", "b3Cl")))], "not a valid ssh private key"),
            (vec![(IDENTITY_FILE, "/no/such/key".into())], "DBKEEPER_AGE_IDENTITY_FILE=/no/such/key: cannot read"),
        ];
        for (pairs, want) in cases {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let msg = config_err(&pairs);
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
            assert!(!msg.contains('\n'), "{msg:?}");
            for secret in [
                &a.secret,
                &typo,
                &a.secret[15..40],
                &typo[15..40],
                "b3BlbnNz",
                "AAAAE2Vj",
            ] {
                assert!(!msg.contains(secret), "{msg:?} shows key material");
            }
        }
        assert!(
            config_err(&[(
                IDENTITY_FILE,
                &write(dir.path(), "i7", &format!("a\n{}\n{typo}", a.secret))
            )])
            .contains("line 1:")
        );
        let typo_file = write(dir.path(), "i8", &format!("{}\n\n{typo}", a.secret));
        assert!(config_err(&[(IDENTITY_FILE, &typo_file)]).contains("line 3:"));
    }

    #[test]
    fn conflicting_variables_are_config_errors() {
        let a = keypair();
        let msg = config_err(&[(RECIPIENTS, &a.public), (RECIPIENTS_FILE, "/x")]);
        assert!(
            msg.contains("both DBKEEPER_AGE_RECIPIENTS and DBKEEPER_AGE_RECIPIENTS_FILE"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        let pass = write(dir.path(), "pass", "pw\n");
        let msg = config_err(&[(RECIPIENTS, &a.public), (PASSPHRASE_FILE, &pass)]);
        assert!(
            msg.contains("DBKEEPER_AGE_PASSPHRASE_FILE are set; use recipients"),
            "{msg}"
        );
        let msg = config_err(&[(PASSPHRASE, "pw"), (PASSPHRASE_FILE, &pass)]);
        assert!(
            msg.contains("both DBKEEPER_AGE_PASSPHRASE and DBKEEPER_AGE_PASSPHRASE_FILE"),
            "{msg}"
        );
        assert!(!msg.contains("pw\n"));
    }

    #[test]
    fn identity_alone_is_decrypt_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "key", &keypair().secret);
        let c = crypto(&[(IDENTITY_FILE, &key)]);
        assert!(c.can_decrypt() && !c.can_encrypt());
        c.probe().unwrap();
        assert!(
            c.describe().starts_with("age: decrypt-only"),
            "{}",
            c.describe()
        );
        assert!(matches!(c.new_set(), Err(Error::Config(m)) if m.contains("set the recipients")));
    }

    #[test]
    fn tampered_or_truncated_ciphertext_never_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = keypair();
        let key = write(dir.path(), "key", &a.secret);
        let c = crypto(&[(RECIPIENTS, &a.public), (IDENTITY_FILE, &key)]);
        let sealer = c.new_set().unwrap().0;
        let opener = c.open_set("s", &sealer.fingerprints(), None).unwrap();
        let data = sample(3 * 65536 + 1000);
        let sealed = seal(&sealer, &data);
        assert_eq!(open(&opener, &sealed).unwrap(), data);
        let header_len = sealed.windows(4).position(|w| w == b"--- ").unwrap();
        let payload = sealed.len() - data.len() - 4 * 16;
        let mut variants: Vec<(String, Vec<u8>)> = Vec::new();
        for cut in [
            1,
            17,
            1000 + 16,
            1000 + 16 + 65536 + 16,
            sealed.len() - payload + 5,
            sealed.len() - 10,
        ] {
            variants.push((
                format!("truncated by {cut}"),
                sealed[..sealed.len() - cut].to_vec(),
            ));
        }
        for at in [
            10,
            header_len + 6,
            payload - 3,
            payload + 5,
            payload + 70_000,
            sealed.len() - 1,
        ] {
            let mut v = sealed.clone();
            v[at] ^= 0x01;
            variants.push((format!("bit flipped at {at}"), v));
        }
        let mut extended = sealed.clone();
        extended.extend_from_slice(&[0; 32]);
        variants.push(("trailing bytes".into(), extended));
        for (what, bad) in variants {
            assert!(
                open(&opener, &bad).is_err(),
                "{what}: read back without an error"
            );
            assert!(
                opener.open_bytes(&bad).is_err(),
                "{what}: open_bytes succeeded"
            );
        }
        // Corruption is not a key problem.
        let mut v = sealed.clone();
        v[payload + 5] ^= 1;
        assert!(matches!(opener.open_bytes(&v), Err(Error::Corrupt { .. })));
    }

    /// The plaintext lengths around chunk boundaries, and a few MB of noise.
    pub(crate) const LENGTHS: [usize; 8] = [
        0,
        1,
        65535,
        65536,
        65537,
        131072,
        131073,
        3 * 1024 * 1024 + 12345,
    ];

    /// An X25519 opener and a sealer to it; and the identity, for the crate's reader.
    pub(crate) fn x25519_pair() -> (SetOpener, SetSealer, Arc<dyn age::Identity + Send + Sync>) {
        let identity = x25519::Identity::generate();
        let sealer = SetSealer {
            recipients: vec![AnyRecipient::X25519(identity.to_public())].into(),
            fingerprints: Vec::new().into(),
        };
        let identity: DynIdentity = Arc::new(identity);
        let opener = SetOpener {
            set_id: "s".into(),
            no_key: "no key".into(),
            identities: vec![identity.clone()].into(),
        };
        (opener, sealer, identity)
    }

    /// A passphrase-sealed (scrypt) file, at a work factor cheap enough for a test.
    pub(crate) fn scrypt_seal(passphrase: &str, data: &[u8]) -> Vec<u8> {
        let mut r = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
        r.set_work_factor(10);
        let e =
            age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient)).unwrap();
        let mut out = Vec::new();
        let mut w = e.wrap_output(&mut out).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap();
        out
    }

    pub(crate) fn scrypt_opener(passphrase: &str) -> (SetOpener, DynIdentity) {
        let identity: DynIdentity = Arc::new(age::scrypt::Identity::new(SecretString::from(
            passphrase.to_owned(),
        )));
        let opener = SetOpener {
            set_id: "s".into(),
            no_key: "no key".into(),
            identities: vec![identity.clone()].into(),
        };
        (opener, identity)
    }

    /// Where the payload starts: after the header's `--- <mac>` line and the 16-byte nonce.
    pub(crate) fn payload_offset(sealed: &[u8]) -> usize {
        let mac = sealed.windows(5).position(|w| w == b"\n--- ").unwrap() + 1;
        let eol = mac + sealed[mac..].iter().position(|&b| b == b'\n').unwrap();
        eol + 1 + 16
    }

    impl Payload {
        /// Seals one chunk as chunk `counter`, final or not: for payloads age would never
        /// write.
        pub(crate) fn seal_chunk(&self, counter: u64, fin: bool, plain: &[u8]) -> Vec<u8> {
            let mut nonce = [0u8; 12];
            nonce[3..11].copy_from_slice(&counter.to_be_bytes());
            nonce[11] = u8::from(fin);
            let mut out = plain.to_vec();
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut out,
                )
                .unwrap();
            out.extend_from_slice(tag.as_ref());
            out
        }
    }

    /// Payload chunks to seal: counter, final flag, plaintext.
    pub(crate) type Chunks<'a> = Vec<(u64, bool, &'a [u8])>;

    /// A file under `opener`'s key with the header of `sealed` and the payload `chunks`
    /// (counter, final flag, plaintext).
    pub(crate) fn crafted(
        opener: &SetOpener,
        sealed: &[u8],
        chunks: &[(u64, bool, &[u8])],
    ) -> Vec<u8> {
        let at = payload_offset(sealed);
        let payload = opener.open_header(&mut &sealed[..]).unwrap();
        let mut out = sealed[..at].to_vec();
        for (counter, fin, plain) in chunks {
            out.extend_from_slice(&payload.seal_chunk(*counter, *fin, plain));
        }
        out
    }

    #[test]
    fn our_payload_decryption_matches_the_crate() {
        let (opener, sealer, identity) = x25519_pair();
        let (s_opener, s_identity) = scrypt_opener("correct horse");
        for len in LENGTHS {
            let data = sample(len);
            let sealed = seal(&sealer, &data);
            let theirs = crate_open(identity.as_ref(), &sealed).unwrap();
            assert!(theirs == data, "{len}: the crate disagrees with the input");
            assert!(
                open(&opener, &sealed).unwrap() == data,
                "x25519, {len} bytes"
            );
            // Passphrase files: scrypt is slow, so a few lengths only.
            if len <= 65537 || len == 131073 {
                let sealed = scrypt_seal("correct horse", &data);
                assert!(crate_open(s_identity.as_ref(), &sealed).unwrap() == data);
                assert!(
                    open(&s_opener, &sealed).unwrap() == data,
                    "scrypt, {len} bytes"
                );
            }
        }
        // Wrong keys fail at the header, as age's own errors, never as data.
        let (other, _, _) = x25519_pair();
        let sealed = seal(&sealer, b"data");
        let err = other.open_header(&mut &sealed[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        let (wrong, _) = scrypt_opener("wrong horse");
        let sealed = scrypt_seal("correct horse", b"data");
        assert!(wrong.open_header(&mut &sealed[..]).is_err());
        // An X25519 key does not open a passphrase file, nor a passphrase an X25519 one.
        assert!(opener.open_header(&mut &sealed[..]).is_err());
        assert!(s_opener.open_header(&mut &seal(&sealer, b"x")[..]).is_err());
    }

    #[test]
    fn payload_damage_is_always_an_error() {
        let (opener, sealer, _) = x25519_pair();
        let (s_opener, _) = scrypt_opener("pw");
        let data = sample(2 * CHUNK + 100);
        for (opener, sealed) in [
            (&opener, seal(&sealer, &data)),
            (&s_opener, scrypt_seal("pw", &data)),
        ] {
            let at = payload_offset(&sealed);
            assert_eq!(sealed.len() - at, 2 * SEALED_CHUNK + 100 + TAG);
            let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
            // A flipped bit in each chunk, in its text and in its tag.
            for chunk in 0..3 {
                for off in [0, 99, 100 + TAG - 1] {
                    let mut v = sealed.clone();
                    let i = (at + chunk * SEALED_CHUNK + off).min(sealed.len() - 1);
                    v[i] ^= 0x04;
                    bad.push((format!("bit flipped in chunk {chunk} at {off}"), v));
                }
            }
            // Truncated anywhere in the payload, including at chunk boundaries (the final
            // chunk missing) and to no payload at all.
            for keep in [
                0,
                1,
                15,
                16,
                SEALED_CHUNK - 1,
                SEALED_CHUNK,
                SEALED_CHUNK + 1,
                2 * SEALED_CHUNK,
                sealed.len() - at - 1,
            ] {
                bad.push((
                    format!("payload cut to {keep}"),
                    sealed[..at + keep].to_vec(),
                ));
            }
            // Bytes after the final chunk, as a whole or a partial chunk.
            for extra in [1, TAG, SEALED_CHUNK] {
                let mut v = sealed.clone();
                v.extend(sample(extra));
                bad.push((format!("{extra} bytes after the final chunk"), v));
            }
            // Chunks swapped.
            let mut v = sealed.clone();
            v.copy_within(at..at + SEALED_CHUNK, at + SEALED_CHUNK);
            bad.push(("chunk 0 twice".into(), v));
            // Payloads age never writes, under the right key.
            let full = &data[..CHUNK];
            let cases: Vec<(&str, Chunks)> = vec![
                (
                    "final flag on a non-final chunk",
                    vec![(0, true, full), (1, true, b"x")],
                ),
                (
                    "final flag on the first of two full chunks",
                    vec![(0, true, full), (1, false, full)],
                ),
                (
                    "a chunk after the final one",
                    vec![(0, false, full), (1, true, full), (2, true, b"x")],
                ),
                ("no final chunk", vec![(0, false, full), (1, false, full)]),
                (
                    "a short non-final chunk",
                    vec![(0, false, b"short"), (1, true, b"x")],
                ),
                (
                    "an empty final chunk after a full one",
                    vec![(0, false, full), (1, true, b"")],
                ),
                ("a skipped counter", vec![(0, false, full), (2, true, b"x")]),
                ("a counter from 1", vec![(1, true, b"x")]),
            ];
            for (what, chunks) in cases {
                bad.push((what.into(), crafted(opener, &sealed, &chunks)));
            }
            for (what, v) in bad {
                assert!(
                    open(opener, &v).is_err(),
                    "{what}: read back without an error"
                );
            }
            // The same construction, well-formed, does read back: the cases above fail for
            // their flaw, not for the construction.
            let good = crafted(opener, &sealed, &[(0, false, full), (1, true, b"x")]);
            let mut want = full.to_vec();
            want.push(b'x');
            assert!(open(opener, &good).unwrap() == want);
            let empty = crafted(opener, &sealed, &[(0, true, b"")]);
            assert!(open(opener, &empty).unwrap().is_empty());
        }
    }

    #[test]
    fn plaintext_ranges_follow_the_chunks() {
        assert_eq!(plaintext(TAG, 0), 0..0);
        assert_eq!(plaintext(TAG + 1, 0), 0..1);
        assert_eq!(plaintext(SEALED_CHUNK, 0), 0..CHUNK);
        assert_eq!(plaintext(2 * SEALED_CHUNK + 20, 0), 0..CHUNK);
        assert_eq!(
            plaintext(2 * SEALED_CHUNK + 20, SEALED_CHUNK),
            SEALED_CHUNK..SEALED_CHUNK + CHUNK
        );
        assert_eq!(
            plaintext(2 * SEALED_CHUNK + 20, 2 * SEALED_CHUNK),
            2 * SEALED_CHUNK..2 * SEALED_CHUNK + 4
        );
    }

    /// `cargo test --release -- --ignored --nocapture throughput`: 256 MiB through seal and
    /// open (memory to a sink), then the stock CLI on the same bytes (page cache to
    /// /dev/null). Rates are per CPU-second (user + system), best of three, since a shared
    /// 2-core machine makes wall time noisy; both sides are single-threaded.
    #[test]
    #[ignore]
    fn throughput() {
        const LEN: usize = 256 << 20;
        // utime + stime of this thread, in clock ticks (USER_HZ, 100 on Linux).
        fn cpu_s() -> f64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
        }
        let best = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
        let mib = |secs: f64| LEN as f64 / (1 << 20) as f64 / secs;
        let dir = tempfile::tempdir().unwrap();
        let a = keypair();
        let key = write(dir.path(), "key", &a.secret);
        let c = crypto(&[(RECIPIENTS, &a.public), (IDENTITY_FILE, &key)]);
        let sealer = c.new_set().unwrap().0;
        let opener = c.open_set("s", &sealer.fingerprints(), None).unwrap();
        let data = sample(LEN);
        let sealed = seal(&sealer, &data);
        let enc = best(&mut || {
            let t = cpu_s();
            let mut w = sealer.seal(io::sink()).unwrap();
            for block in data.chunks(1 << 20) {
                w.write_all(block).unwrap();
            }
            w.finish().unwrap();
            cpu_s() - t
        });
        let mut buf = vec![0; 16 * SEALED_CHUNK];
        let identity = x25519::Identity::from_str(&a.secret).unwrap();
        let crate_dec = best(&mut || {
            let t = cpu_s();
            let mut r = age::Decryptor::new(&sealed[..])
                .unwrap()
                .decrypt(std::iter::once(&identity as &dyn age::Identity))
                .unwrap();
            let mut n = 0;
            loop {
                let k = r.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            assert_eq!(n, LEN);
            cpu_s() - t
        });
        // Ours, a buffer of 16 chunks at a time as the set reader's stages do.
        let dec = best(&mut || {
            let t = cpu_s();
            let mut r = &sealed[..];
            let mut payload = opener.open_header(&mut r).unwrap();
            let mut n = 0;
            let mut blocks = r.chunks(16 * SEALED_CHUNK).peekable();
            while let Some(block) = blocks.next() {
                let b = &mut buf[..block.len()];
                b.copy_from_slice(block);
                payload.open_in_place(b, blocks.peek().is_none()).unwrap();
                n += (0..b.len())
                    .step_by(SEALED_CHUNK)
                    .map(|s| plaintext(b.len(), s).len())
                    .sum::<usize>();
            }
            assert_eq!(n, LEN);
            cpu_s() - t
        });
        eprintln!(
            "seal (crate) {:.0} MiB/s, open: crate {:.0} MiB/s, ours (ring) {:.0} MiB/s",
            mib(enc),
            mib(crate_dec),
            mib(dec)
        );
        let Some(age) = age_cli() else { return };
        let plain = write_bytes(dir.path(), "plain", &data);
        let cipher = write_bytes(dir.path(), "cipher", &sealed);
        // bash's `time` reports the child's user and system CPU.
        let timed = |args: &str| {
            let out = run(Command::new("bash").arg("-c").arg(format!(
                "TIMEFORMAT='%3U %3S'; {{ time {age} {args} >/dev/null 2>&1; }} 2>&1"
            )));
            let out = String::from_utf8(out).unwrap();
            out.split_whitespace()
                .map(|x| x.parse::<f64>().unwrap())
                .sum::<f64>()
        };
        let enc = best(&mut || timed(&format!("-r {} -o /dev/null {plain}", a.public)));
        let dec = best(&mut || timed(&format!("-d -i {key} -o /dev/null {cipher}")));
        eprintln!(
            "age CLI: -r {:.0} MiB/s, -d {:.0} MiB/s",
            mib(enc),
            mib(dec)
        );
    }
}
