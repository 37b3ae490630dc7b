//! A catalog fed through a watch channel, a DNS server on 127.0.0.1:0, and clients: the
//! hickory client over UDP and TCP, and raw sockets for bytes the client would not send.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_server::net::client::{Client, ClientHandle};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::tcp::TcpClientStream;
use hickory_server::net::udp::UdpClientStream;
use meshbridge_core::model::{
    Catalog, Endpoint, Export, Locality, Port, Protocol, ServiceKey, Site, SiteKind, SiteState,
};
use meshbridge_federation::dns::{Config, DnsHandle, DnsServer, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

pub const NS: &str = "shop";

/// The catalog replica a test controls.
pub struct World {
    pub catalog: Catalog,
    pub tx: watch::Sender<Arc<Catalog>>,
}

impl World {
    pub fn new() -> (World, watch::Receiver<Arc<Catalog>>) {
        let catalog = Catalog::default();
        let (tx, rx) = watch::channel(Arc::new(catalog.clone()));
        (World { catalog, tx }, rx)
    }

    pub fn site(&mut self, name: &str, state: SiteState) -> &mut Self {
        self.catalog.revision += 1;
        let site = Site {
            name: name.into(),
            kind: SiteKind::Cluster,
            locality: Locality::default(),
            gateways: vec![format!("{name}.gw.example:15443")],
            lease_ttl_ms: 10_000,
            grace_ms: 60_000,
            last_heartbeat_ms: 0,
            state,
            created_revision: self.catalog.revision,
            links: Vec::new(),
            instances: Vec::new(),
            xds_rejections: Vec::new(),
        };
        self.catalog.sites.insert(name.into(), Arc::new(site));
        self
    }

    pub fn export(&mut self, mut export: Export) -> &mut Self {
        self.catalog.revision += 1;
        let key = export.key();
        let created = self
            .catalog
            .exports
            .get(&key)
            .map_or(self.catalog.revision, |e| e.created_revision);
        export.created_revision = created;
        export.updated_revision = self.catalog.revision;
        self.catalog.exports.insert(key, Arc::new(export));
        self
    }

    /// Send the catalog to the server's watch.
    pub fn publish(&mut self) {
        self.catalog.revision += 1;
        self.tx.send_replace(Arc::new(self.catalog.clone()));
    }
}

pub fn port(name: &str, port: u16, target_port: u16) -> Port {
    Port {
        name: name.into(),
        port,
        protocol: Protocol::Tcp,
        target_port,
        app_protocol: None,
    }
}

pub fn ep(address: &str, hostname: Option<&str>) -> Endpoint {
    Endpoint {
        address: address.parse().unwrap(),
        hostname: hostname.map(Into::into),
        ready: true,
        weight: 1,
        identity: None,
        zone: None,
    }
}

pub fn export(site: &str, service: &str, ports: Vec<Port>, endpoints: Vec<Endpoint>) -> Export {
    Export {
        site: site.into(),
        service: ServiceKey::new(NS, service),
        generation: 1,
        ports,
        endpoints,
        headless: false,
        created_revision: 0,
        updated_revision: 0,
    }
}

pub fn headless(site: &str, service: &str, ports: Vec<Port>, endpoints: Vec<Endpoint>) -> Export {
    Export {
        headless: true,
        ..export(site, service, ports, endpoints)
    }
}

/// `<svc>.shop.svc.clusterset.local.`
pub fn svc(name: &str) -> String {
    format!("{name}.{NS}.svc.clusterset.local.")
}

pub async fn start(config: Config, rx: watch::Receiver<Arc<Catalog>>) -> DnsHandle {
    DnsServer::start(config, rx).await.unwrap()
}

pub const BOTH: [Transport; 2] = [Transport::Udp, Transport::Tcp];

/// One query with the hickory client (EDNS on, as the client sends it).
pub async fn ask(addr: SocketAddr, transport: Transport, name: &str, rtype: RecordType) -> Message {
    let provider = TokioRuntimeProvider::default();
    let mut client = match transport {
        Transport::Udp => {
            let stream = UdpClientStream::builder(addr, provider)
                .with_timeout(Some(Duration::from_secs(5)))
                .build();
            let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
            tokio::spawn(bg);
            client
        }
        Transport::Tcp => {
            let (stream, handle) =
                TcpClientStream::new(addr, None, Some(Duration::from_secs(5)), provider);
            let (client, bg) = Client::<TokioRuntimeProvider>::new(stream.await.unwrap(), handle);
            tokio::spawn(bg);
            client
        }
    };
    let name = Name::from_ascii(name).unwrap();
    client
        .query(name, DNSClass::IN, rtype)
        .await
        .unwrap()
        .into_message()
}

/// The addresses in the answer section.
pub fn addresses(msg: &Message) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

pub fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    out.sort();
    out
}

/// A query message as bytes; `edns` is the advertised UDP payload size.
pub fn query_bytes(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg.to_vec().unwrap()
}

/// Send bytes over UDP; the reply, or None after a second of silence.
pub async fn raw_udp(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let recv = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await;
    recv.ok().map(|n| buf[..n.unwrap()].to_vec())
}

/// Send one length-prefixed message over a new TCP connection; the reply, or None when the
/// server closes the connection or stays silent for a second.
pub async fn raw_tcp(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.unwrap();
    let read = async {
        let len = stream.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
}

/// A query over raw UDP or TCP, parsed.
pub async fn ask_raw(addr: SocketAddr, transport: Transport, bytes: &[u8]) -> Message {
    let reply = match transport {
        Transport::Udp => raw_udp(addr, bytes).await,
        Transport::Tcp => raw_tcp(addr, bytes).await,
    };
    Message::from_vec(&reply.expect("no reply")).unwrap()
}

/// The SOA in the authority section: (serial, minimum).
pub fn soa_of(msg: &Message) -> Option<(u32, u32)> {
    msg.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some((soa.serial, soa.minimum)),
        _ => None,
    })
}
