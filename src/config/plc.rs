//! `[modbus]`: the controller protocols (docs/PLC.md).

use std::net::{IpAddr, SocketAddr};

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
