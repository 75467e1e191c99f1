//! Operator logins: argon2 password hashes from `[[ui.operator]]`, server-side sessions behind an
//! HttpOnly, SameSite=Strict cookie, and a CSRF token per session that every action must carry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::http::HeaderMap;
use axum::http::header;

use crate::config::daemon::Secret;
use crate::config::ui::Operator;
use crate::util::sync;

/// The session cookie's name.
pub const COOKIE: &str = "anomalyd_ui";

/// Most sessions kept at once; a login beyond it ends the least recently used one.
pub const MAX_SESSIONS: usize = 64;

/// A logged-in operator, as a request sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub csrf: String,
}

#[derive(Debug)]
struct Session {
    login: Login,
    last_use: Instant,
}

#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    ttl: Duration,
    operators: Vec<Operator>,
    /// Checked for unknown names, so that they take as long as known ones.
    dummy: String,
}

/// 32 random bytes from the system's generator, as hex.
pub fn random_token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the system random generator works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The argon2id hash (PHC string) of a password, with a random salt: what `[[ui.operator]]` keeps.
pub fn hash_password(password: &str) -> String {
    use ring::rand::SecureRandom;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut salt).expect("the system random generator works");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes make a salt");
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 hashes a password").to_string()
}

impl Sessions {
    pub fn new(operators: &[Operator], ttl: Duration) -> Self {
        Self {
            map: Mutex::default(),
            ttl,
            operators: operators.to_vec(),
            dummy: hash_password("not a password anyone has"),
        }
    }

    /// Whether any operator can log in.
    pub fn has_operators(&self) -> bool {
        !self.operators.is_empty()
    }

    /// Whether `password` is `name`'s. Slow on purpose (argon2): run it off the async threads.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        let known = self.operators.iter().find(|o| o.name == name);
        let hash = known.map_or(self.dummy.as_str(), |o| o.password_hash.as_str());
        let ok = PasswordHash::new(hash)
            .is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok());
        ok && known.is_some()
    }

    /// A new session for `user`: its cookie token and login.
    pub fn open(&self, user: &str) -> (String, Login) {
        let token = random_token();
        let login = Login { user: user.into(), csrf: random_token() };
        let mut map = sync::lock(&self.map);
        let now = Instant::now();
        map.retain(|_, s| now.duration_since(s.last_use) < self.ttl);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_use).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(token.clone(), Session { login: login.clone(), last_use: now });
        (token, login)
    }

    /// The login a request's cookie belongs to, if it is current (using it keeps it current).
    pub fn get(&self, headers: &HeaderMap) -> Option<Login> {
        let token = cookie(headers, COOKIE)?;
        let mut map = sync::lock(&self.map);
        let s = map.get_mut(token)?;
        if s.last_use.elapsed() >= self.ttl {
            map.remove(token);
            return None;
        }
        s.last_use = Instant::now();
        Some(s.login.clone())
    }

    /// Ends the session of a request's cookie.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(token) = cookie(headers, COOKIE) {
            sync::lock(&self.map).remove(token);
        }
    }

    /// The cookie that carries a session: HttpOnly (no script reads it), SameSite=Strict (no other site's
    /// page sends it), limited to the pages.
    pub fn set_cookie(&self, token: &str) -> String {
        format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}", self.ttl.as_secs())
    }
}

/// The cookie that ends a session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Whether `given` is the login's CSRF token (constant time).
pub fn csrf_ok(login: &Login, given: Option<&str>) -> bool {
    given.is_some_and(|g| Secret(login.csrf.clone()).matches(g))
}

/// The value of cookie `name` in a request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, cookie.parse().unwrap());
        h
    }

    #[test]
    fn a_password_opens_a_session_and_nothing_else_does() {
        let op = Operator { name: "anna".into(), password_hash: hash_password("correct horse") };
        let s = Sessions::new(&[op], Duration::from_secs(60));
        assert!(s.verify("anna", "correct horse"));
        assert!(!s.verify("anna", "correct hors"));
        assert!(!s.verify("ben", "correct horse"));
        assert!(!s.verify("ben", "not a password anyone has"), "the dummy hash is nobody's");
        let (token, login) = s.open("anna");
        let got = s.get(&headers(&format!("theme=dark; {COOKIE}={token}"))).unwrap();
        assert_eq!(got, login);
        assert!(s.get(&headers(&format!("{COOKIE}={}", random_token()))).is_none());
        assert!(csrf_ok(&login, Some(&login.csrf)) && !csrf_ok(&login, None) && !csrf_ok(&login, Some("x")));
        s.close(&headers(&format!("{COOKIE}={token}")));
        assert!(s.get(&headers(&format!("{COOKIE}={token}"))).is_none());
        assert!(s.set_cookie(&token).contains("HttpOnly; SameSite=Strict"));
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s = Sessions::new(&[], Duration::from_millis(0));
        let (token, _) = s.open("anna");
        assert!(s.get(&headers(&format!("{COOKIE}={token}"))).is_none(), "a zero lifetime expires at once");
        let s = Sessions::new(&[], Duration::from_secs(60));
        let first = s.open("a").0;
        for _ in 0..MAX_SESSIONS {
            s.open("b");
        }
        assert!(s.get(&headers(&format!("{COOKIE}={first}"))).is_none(), "the least recently used went");
        assert_eq!(sync::lock(&s.map).len(), MAX_SESSIONS);
    }
}
