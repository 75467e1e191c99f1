//! `[modbus]` and `[opcua]`: the controller protocols (docs/PLC.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[modbus]`: a Modbus TCP server with the trigger/acknowledge handshake, one unit per camera.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModbusConfig {
    /// Address of the Modbus TCP server; "" (the default) turns it off. Modbus has no authentication:
    /// bind it to the machine network's address only, and list the PLCs in `allow`.
    pub listen: String,
    /// Client addresses that may connect: addresses (`10.0.0.5`) or blocks (`10.0.0.0/24`). Empty: only
    /// this machine (127.0.0.1 and ::1).
    pub allow: Vec<String>,
}

/// An address or a block of addresses a client may connect from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    net: IpAddr,
    prefix: u8,
}

impl Allowed {
    /// `10.0.0.5`, `10.0.0.0/24`, `fd00::/8`.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().ok()?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Self { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl ModbusConfig {
    /// The allowlist (unparsable entries are [`ModbusConfig::validate`]'s business).
    pub fn allowed(&self) -> Vec<Allowed> {
        if self.allow.is_empty() {
            return ["127.0.0.1", "::1"].iter().filter_map(|a| Allowed::parse(a)).collect();
        }
        self.allow.iter().filter_map(|a| Allowed::parse(a)).collect()
    }

    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "modbus.listen = {:?}: use \"address:port\" (e.g. \"10.0.0.2:502\") or \"\" for off",
                self.listen
            ));
        }
        for a in &self.allow {
            if Allowed::parse(a).is_none() {
                p.push(format!("modbus.allow: {a:?} is not an address or a block such as \"10.0.0.0/24\""));
            }
        }
        p
    }
}

/// `[opcua]`: an OPC UA server with a node tree shaped after OPC 40100 (Machine Vision): per camera
/// its state, recipe and last result, a `ResultReady` event, and the methods `Trigger` and
/// `SelectRecipe`. Off unless `listen` is set; anonymous sessions are refused unless `anonymous`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpcUaConfig {
    /// `address:port` the server listens on (4840 is OPC UA's port); "" (the default) turns it off.
    pub listen: String,
    /// Security policies of the endpoints, each with SignAndEncrypt: `basic256sha256`,
    /// `aes128sha256rsaoaep`, `aes256sha256rsapss`; `none` adds an unsigned endpoint (the password is
    /// still encrypted with the server's certificate), for test benches only.
    pub security: Vec<String>,
    /// The server's certificate store: `own/` (its certificate, made at the first start), `private/`,
    /// `trusted/` (client certificates allowed in: copy them there from `rejected/`). Default:
    /// `<state dir>/opcua-pki`.
    pub pki_dir: Option<PathBuf>,
    /// The host name in the endpoint URLs and the server certificate; default: the listen address.
    pub host: Option<String>,
    /// Sessions with no user at all; off by default.
    pub anonymous: bool,
    /// Who may log in: a name with a password file, or a user certificate.
    pub user: Vec<OpcUaUser>,
}

impl Default for OpcUaConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            security: vec!["basic256sha256".into()],
            pki_dir: None,
            host: None,
            anonymous: false,
            user: Vec::new(),
        }
    }
}

/// `[[opcua.user]]`: a user name with its password (the first line of `password_file`), or a user
/// certificate (X.509, DER or PEM) whose holder logs in with it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpcUaUser {
    pub name: String,
    pub password_file: Option<PathBuf>,
    pub certificate: Option<PathBuf>,
}

/// The security policies `[opcua].security` may name.
pub const OPCUA_SECURITY: [&str; 4] = ["basic256sha256", "aes128sha256rsaoaep", "aes256sha256rsapss", "none"];

impl OpcUaConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.listen.is_empty() {
            return p;
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "opcua.listen = {:?}: use \"address:port\" (e.g. \"10.0.0.2:4840\") or \"\" for off",
                self.listen
            ));
        }
        if self.security.is_empty() {
            p.push("opcua.security is empty: name at least one policy, e.g. [\"basic256sha256\"]".into());
        }
        for s in &self.security {
            if !OPCUA_SECURITY.contains(&s.as_str()) {
                p.push(format!("opcua.security: {s:?} is not one of {}", OPCUA_SECURITY.join(", ")));
            }
        }
        if self.user.is_empty() && !self.anonymous {
            p.push("opcua: nobody can log in: add an [[opcua.user]] with a password_file or a certificate".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, u) in self.user.iter().enumerate() {
            let at = format!("opcua.user[{i}]");
            if u.name.is_empty() || u.name.len() > 64 || u.name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                p.push(format!("{at}.name = {:?}: 1-64 characters, no spaces", u.name));
            }
            if !seen.insert(u.name.clone()) {
                p.push(format!("{at}.name = {:?} is listed twice", u.name));
            }
            if u.password_file.is_some() == u.certificate.is_some() {
                p.push(format!("{at}: give exactly one of password_file and certificate"));
            }
            for (key, path) in [("password_file", &u.password_file), ("certificate", &u.certificate)] {
                if let Some(path) = path
                    && !path.is_file()
                {
                    p.push(format!("{at}.{key} = {}: no such file", path.display()));
                }
            }
        }
        if !cfg!(feature = "opcua") {
            p.push("opcua.listen is set, but this build has no OPC UA server (build with --features opcua)".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_takes_addresses_and_blocks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let block = Allowed::parse("10.0.0.0/24").unwrap();
        assert!(block.contains(ip("10.0.0.77")) && !block.contains(ip("10.0.1.1")));
        assert!(block.contains(ip("::ffff:10.0.0.9")), "an IPv4 client on a dual-stack socket");
        assert!(Allowed::parse("0.0.0.0/0").unwrap().contains(ip("192.168.1.1")));
        assert!(Allowed::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Allowed::parse("10.0.0.5").unwrap().contains(ip("10.0.0.6")));
        for bad in ["10.0.0.0/33", "ten", "10.0.0/8", ""] {
            assert!(Allowed::parse(bad).is_none(), "{bad}");
        }
        let local = ModbusConfig::default().allowed();
        assert!(local.iter().any(|a| a.contains(ip("127.0.0.1"))) && !local.iter().any(|a| a.contains(ip("10.0.0.1"))));
        let cfg = ModbusConfig { listen: "502".into(), allow: vec!["x".into()] };
        assert_eq!(cfg.validate().len(), 2);
    }
}
