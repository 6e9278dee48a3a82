//! Who the client is, by address: the socket's peer, unless the peer is a proxy named in
//! `--trusted-proxies`, whose `Fly-Client-IP` or `X-Forwarded-For` then names the client.
//! From anyone else those headers are ignored, so a client cannot pick its own address to
//! dodge a per-address limit or to blame another in the audit log.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::Headers;

#[derive(Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Comma-separated addresses or CIDR ranges; empty: none.
    pub fn parse(text: &str) -> Result<TrustedProxies, String> {
        text.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<IpNet>()
                    .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted_proxies: '{t}' is not an address or CIDR range"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer`.
    pub fn client(&self, peer: Option<IpAddr>, headers: &dyn Headers) -> Option<IpAddr> {
        // An IPv4 peer of a dual-stack socket (`--host ::`) comes as `::ffff:a.b.c.d`, which an
        // IPv4 range does not contain.
        let peer = peer?.to_canonical();
        if !self.trusts(peer) {
            return Some(peer);
        }
        if let Some(ip) = headers.first("fly-client-ip").and_then(address) {
            return Some(ip);
        }
        // The last address that is not one of our proxies is the one the nearest proxy saw.
        // Walked from the nearest: an entry that is not an address (`unknown`, an obfuscated
        // name) ends the walk at the peer, as what lies before it was written by whoever
        // that entry stands for, the client included.
        let forwarded: Vec<&str> = headers
            .all("x-forwarded-for")
            .into_iter()
            .flat_map(|v| v.split(','))
            .collect();
        for entry in forwarded.into_iter().rev() {
            match address(entry) {
                Some(ip) if self.trusts(ip) => continue,
                Some(ip) => return Some(ip),
                None => break,
            }
        }
        Some(peer)
    }
}

/// An address as forwarding headers write it: bare, or with a port (`203.0.113.7:4711`,
/// `[2001:db8::7]:4711`, as some load balancers append it).
fn address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        let spoofed = headers(&[("x-forwarded-for", "1.2.3.4"), ("fly-client-ip", "5.6.7.8")]);
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(proxies.client(Some(stranger), &spoofed), Some(stranger));
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            proxies.client(Some(proxy), &spoofed),
            Some("5.6.7.8".parse().unwrap())
        );
        let chain = headers(&[("x-forwarded-for", "9.9.9.9, 198.51.100.7, 10.0.0.2")]);
        assert_eq!(
            proxies.client(Some(proxy), &chain),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(proxies.client(Some(proxy), &headers(&[])), Some(proxy));
        // A port on the nearest entry does not let an earlier (client-written) one through.
        let ported = headers(&[("x-forwarded-for", "9.9.9.9, 198.51.100.7:4711")]);
        assert_eq!(
            proxies.client(Some(proxy), &ported),
            Some("198.51.100.7".parse().unwrap())
        );
        let v6 = headers(&[("x-forwarded-for", "9.9.9.9, [2001:db8::7]:4711")]);
        assert_eq!(
            proxies.client(Some(proxy), &v6),
            Some("2001:db8::7".parse().unwrap())
        );
        let unknown = headers(&[("x-forwarded-for", "9.9.9.9, unknown")]);
        assert_eq!(proxies.client(Some(proxy), &unknown), Some(proxy));
        // A trusted IPv4 proxy on a dual-stack socket.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            proxies.client(Some(mapped), &chain),
            Some("198.51.100.7".parse().unwrap())
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
    }
}
