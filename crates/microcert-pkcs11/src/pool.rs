//! The PKCS#11 module, loaded and initialised once per process, and a pool
//! of logged-in sessions on one token.
//!
//! `C_Initialize` may run only once per process and module (a second call
//! answers CKR_CRYPTOKI_ALREADY_INITIALIZED), and a module such as SoftHSM2
//! reads its configuration and lists its tokens at that moment. So every
//! card in a process that names the same module shares one context.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::error::{Pkcs11Error, Result};

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (a map or a list of sessions), never a half-made invariant.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process-wide context of the module at `path`, initialised on first
/// use (with OS locking: sessions are used from many threads).
pub(crate) fn module(path: &Path) -> Result<Pkcs11> {
    let mut map = lock(MODULES.get_or_init(Default::default));
    if let Some(ctx) = map.get(path) {
        return Ok(ctx.clone());
    }
    let err = |reason: String| Pkcs11Error::Module {
        path: path.to_path_buf(),
        reason,
    };
    let ctx = Pkcs11::new(path).map_err(|e| err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another part of the process (outside this crate) initialised the
        // same module: its context is the same library state, use it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err(format!("C_Initialize: {e}"))),
    }
    map.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// The one slot whose token carries `label` (PKCS#11 pads labels with
/// spaces to 32 bytes; cryptoki trims them).
pub(crate) fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot> {
    let mut found = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        if ctx.get_token_info(slot)?.label() == label {
            found.push(slot);
        }
    }
    match found.len() {
        0 => Err(Pkcs11Error::TokenNotFound {
            label: label.to_owned(),
        }),
        1 => Ok(found[0]),
        count => Err(Pkcs11Error::TokenAmbiguous {
            label: label.to_owned(),
            count,
        }),
    }
}

/// Opens a read-write session and logs the user in. PKCS#11 login state is
/// per application and token, so a second session is already logged in;
/// CKR_USER_ALREADY_LOGGED_IN is success.
pub(crate) fn user_session(ctx: &Pkcs11, slot: Slot, pin: &Zeroizing<String>) -> Result<Session> {
    let session = ctx.open_rw_session(slot)?;
    let auth = AuthPin::new(pin.as_str().into());
    match session.login(UserType::User, Some(&auth)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e.into()),
    }
}

/// A fixed set of logged-in sessions on one token. A caller borrows one for
/// one operation; when all are busy it waits for the next one returned.
///
/// A session the token invalidated (closed by C_CloseAllSessions from
/// another part of the process, a token removed and reinserted, an HSM
/// restarted, a login state lost) is replaced by [`SessionPool::with_retry`]:
/// a new session is opened and logged in with the PIN the pool keeps
/// (zeroized when the pool drops; never printed), and the operation runs
/// once more on it.
pub(crate) struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    size: usize,
    ctx: Pkcs11,
    slot: Slot,
    pin: Zeroizing<String>,
}

/// A borrowed session, returned to the pool when dropped (even when the
/// operation panics, so a panic cannot shrink the pool).
struct Borrowed<'a>(&'a SessionPool, Option<Session>);

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.1.take() {
            lock(&self.0.idle).push(s);
            self.0.returned.notify_one();
        }
    }
}

impl Borrowed<'_> {
    fn session(&self) -> &Session {
        match self.1.as_ref() {
            Some(s) => s,
            None => unreachable!("the guard holds the session until it drops"),
        }
    }
}

/// Whether an error means the session itself is gone (not the operation's
/// input): the session is then replaced.
pub(crate) fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent,
            _
        )
    )
}

impl SessionPool {
    /// Opens `size` (at least 1) sessions; the first logs in.
    pub(crate) fn open(
        ctx: &Pkcs11,
        slot: Slot,
        pin: &Zeroizing<String>,
        size: usize,
    ) -> Result<Self> {
        let size = size.max(1);
        let mut sessions = Vec::with_capacity(size);
        for _ in 0..size {
            sessions.push(user_session(ctx, slot, pin)?);
        }
        Ok(SessionPool {
            idle: Mutex::new(sessions),
            returned: Condvar::new(),
            size,
            ctx: ctx.clone(),
            slot,
            pin: pin.clone(),
        })
    }

    /// How many sessions the pool holds.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    fn borrow(&self) -> Borrowed<'_> {
        let mut idle = lock(&self.idle);
        loop {
            if let Some(s) = idle.pop() {
                return Borrowed(self, Some(s));
            }
            idle = self
                .returned
                .wait(idle)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs `f` on a borrowed session.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Session) -> T) -> T {
        let guard = self.borrow();
        f(guard.session())
    }

    /// Runs `f` on a borrowed session; if the token invalidated the
    /// session, replaces it (a new session, logged in again) and runs `f`
    /// once more. If no new session can be opened, the first error is
    /// returned and the old session goes back (the next call tries again).
    pub(crate) fn with_retry<T>(
        &self,
        mut f: impl FnMut(&Session) -> std::result::Result<T, CkError>,
    ) -> std::result::Result<T, CkError> {
        let mut guard = self.borrow();
        match f(guard.session()) {
            Err(e) if session_lost(&e) => match user_session(&self.ctx, self.slot, &self.pin) {
                Ok(fresh) => {
                    tracing::warn!(error = %e, "PKCS#11 session lost: replaced by a new one");
                    // The old handle is dead: dropping it may fail quietly.
                    guard.1 = Some(fresh);
                    f(guard.session())
                }
                Err(_) => Err(e),
            },
            other => other,
        }
    }
}
