//! The DNS server on the bridge address: `NAME.vm` resolves to the VM's IPv4 address, every
//! other name is forwarded to the host's own resolvers.
//!
//! Guests' `/etc/resolv.conf` names this server alone, and the host reaches it through
//! systemd-resolved's `~vm` routing domain, so it answers the `vm.` zone itself and must relay
//! everything else. It owns one UDP socket, bound on the bridge address, and the forwarding
//! tasks it spawns; the VM names come from a [`Lookup`] the daemon gives it, asked afresh for
//! every query so a VM is resolvable as soon as it has an address and gone as soon as it
//! loses it.
//!
//! Lifecycle:
//! 1. [`DnsServer::bind`] binds the socket (the bridge must be up and have its address; port 53
//!    needs `CAP_NET_BIND_SERVICE`). The upstream list is fixed from then on, usually taken from
//!    the host's resolv.conf by [`upstream_from_resolv_conf`], which leaves out the bridge
//!    address so the server never forwards to itself.
//! 2. [`DnsServer::serve`] reads queries one by one. A `.vm` query is answered on the spot
//!    (the lookup must therefore be quick and never block). Anything else is handed to a task
//!    of its own that tries each upstream in turn (2 s each, on a fresh socket, so a slow
//!    upstream never holds up `.vm` answers), relays the first matching reply unchanged, or
//!    answers SERVFAIL. At most [`MAX_CONCURRENT_FORWARDS`] forwards run at once; a query over
//!    that is dropped and the client retries as it would after a lost packet.
//! 3. When the cancellation token fires, `serve` aborts the forwards still running and returns,
//!    which closes the socket: the address can be bound again at once.
//!
//! Known weaknesses:
//! - UDP only. No TCP listener, so an upstream answer too large for UDP arrives truncated (TC
//!   set) and is relayed as such; the client then retries over TCP, which this server does not
//!   serve, and that lookup fails. Our own answers are a single A record and always fit.
//! - Upstream answers are relayed byte for byte, even when larger than the 512 bytes a client
//!   without EDNS accepts; upstreams size their replies to the query they were sent, which is
//!   the client's own, so in practice they already fit.
//! - Negative `.vm` answers carry no SOA, so resolvers do not cache them: a VM that just got its
//!   address is found on the next query instead of after a negative-cache TTL.
//! - The upstream list is read once; a host whose resolvers change (DHCP, VPN) needs the server
//!   rebuilt to follow.
//! - No rate limiting beyond the forward cap: anything that can reach the bridge address can
//!   use the server as a recursive resolver.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Looks a VM name up (the label before `.vm`, already lowercased): its IPv4 address if a VM of
/// that name has one.
pub type Lookup = Arc<dyn Fn(&str) -> Option<Ipv4Addr> + Send + Sync>;

/// Short, because addresses move as VMs are destroyed and recreated under the same name.
pub const VM_TTL_SECONDS: u32 = 5;

/// Forwards in flight at once; each holds a socket and a 64 KiB buffer for at most
/// `upstreams × 2 s`, so this caps both memory and open sockets under a query flood.
pub const MAX_CONCURRENT_FORWARDS: usize = 256;

/// How long one upstream gets to answer before the next is tried.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The zone this server is authoritative for.
const ZONE_LABEL: &[u8] = b"vm";

/// Large enough for any UDP datagram, so nothing an upstream sends is cut when relayed.
const MAX_DATAGRAM: usize = 65_535;

/// The UDP payload size advertised in our EDNS answers: the size DNS flag day 2020 settled on
/// as safe from fragmentation.
const EDNS_PAYLOAD: u16 = 1232;

/// A receive error on the listening socket is retried after this pause, so a persistent one
/// (it should not happen) cannot spin a core.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot serve DNS on {address}/udp: {source} (the address must be one of this host's, \
         e.g. the bridge's once it is up, and port 53 needs CAP_NET_BIND_SERVICE)"
    )]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the local address of the DNS socket bound on {address}: {source}")]
    LocalAddr {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

pub struct DnsServer {
    socket: UdpSocket,
    local_addr: SocketAddr,
    lookup: Lookup,
    upstream: Vec<SocketAddr>,
    /// Per upstream; a field rather than the constant so tests can wait less.
    forward_timeout: Duration,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.upstream)
            .field("forward_timeout", &self.forward_timeout)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP on `listen` (port 0 allowed, for tests). `upstream`: resolvers to forward
    /// non-.vm queries to, in order.
    pub async fn bind(
        listen: SocketAddr,
        lookup: Lookup,
        upstream: Vec<SocketAddr>,
    ) -> Result<DnsServer, DnsError> {
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                address: listen,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| DnsError::LocalAddr {
            address: listen,
            source,
        })?;
        Ok(DnsServer {
            socket,
            local_addr,
            lookup,
            upstream,
            forward_timeout: FORWARD_TIMEOUT,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `cancel` fires. Never returns an error for a bad packet: a malformed query
    /// is dropped (or FORMERR if its header parsed).
    pub async fn serve(self, cancel: CancellationToken) {
        let DnsServer {
            socket,
            local_addr: _,
            lookup,
            upstream,
            forward_timeout,
        } = self;
        let socket = Arc::new(socket);
        let upstream: Arc<[SocketAddr]> = upstream.into();
        let forward_slots = Arc::new(Semaphore::new(MAX_CONCURRENT_FORWARDS));
        // Owned here so that returning aborts them: their clones of the socket would otherwise
        // keep the address bound for up to `upstreams × timeout` after cancellation.
        let mut forwards = JoinSet::new();
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                // Reaps finished forwards so the set does not grow with every query served.
                Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
                received = socket.recv_from(&mut buffer) => {
                    let (length, client) = match received {
                        Ok(received) => received,
                        Err(_) => {
                            tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                            continue;
                        }
                    };
                    let packet = &buffer[..length];
                    match decide(packet, &lookup, !upstream.is_empty()) {
                        Decision::Drop => {}
                        Decision::Reply(reply) => {
                            // A lost reply is the client's to retry, like any lost datagram.
                            let _ = socket.send_to(&reply, client).await;
                        }
                        Decision::Forward(query) => {
                            let Ok(slot) = Arc::clone(&forward_slots).try_acquire_owned() else {
                                continue;
                            };
                            let forward = Forward {
                                raw: packet.to_vec(),
                                query,
                                client,
                                socket: Arc::clone(&socket),
                                upstream: Arc::clone(&upstream),
                                timeout: forward_timeout,
                            };
                            forwards.spawn(async move {
                                forward.run().await;
                                drop(slot);
                            });
                        }
                    }
                }
            }
        }
        forwards.shutdown().await;
    }
}

/// What to do with one received datagram; decided without I/O so every path is testable, and
/// fuzzable, without sockets.
#[derive(Debug)]
enum Decision {
    Drop,
    Reply(Vec<u8>),
    /// Not ours: relay to the upstreams. Carries the parsed query for the SERVFAIL answer.
    Forward(Message),
}

fn decide(packet: &[u8], lookup: &Lookup, has_upstream: bool) -> Decision {
    let Ok(header) = Header::read(&mut BinDecoder::new(packet)) else {
        // Not even an id to answer to.
        return Decision::Drop;
    };
    if header.message_type == MessageType::Response {
        // Answering a response could start a loop with another server (or a spoofed one).
        return Decision::Drop;
    }
    if header.op_code != OpCode::Query {
        return encode(error_reply(&header.metadata, ResponseCode::NotImp));
    }
    let query = match Message::from_vec(packet) {
        Ok(query) => query,
        Err(_) => return encode(error_reply(&header.metadata, ResponseCode::FormErr)),
    };
    let [question] = query.queries.as_slice() else {
        // Zero or several questions: no server answers those meaningfully (RFC 9619).
        return encode(error_reply(&header.metadata, ResponseCode::FormErr));
    };

    let mut labels = question.name().iter();
    if !labels
        .next_back()
        .is_some_and(|last| last.eq_ignore_ascii_case(ZONE_LABEL))
    {
        return if has_upstream {
            Decision::Forward(query)
        } else {
            encode(reply_to(&query, ResponseCode::Refused))
        };
    }

    let mut reply = reply_to(&query, ResponseCode::NoError);
    reply.metadata.authoritative = true;
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        reply.metadata.authoritative = false;
        reply.metadata.response_code = ResponseCode::Refused;
        return encode(reply);
    }
    let vm_name = match (labels.next(), labels.next()) {
        // The zone apex `vm.` exists but has no records of its own: NODATA.
        (None, _) => return encode(reply),
        (Some(label), None) => label,
        // `a.b.vm.`: VM names are one label; nothing lives deeper.
        (Some(_), Some(_)) => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            return encode(reply);
        }
    };
    let address = std::str::from_utf8(vm_name)
        .ok()
        .and_then(|name| lookup(&name.to_ascii_lowercase()));
    let Some(address) = address else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return encode(reply);
    };
    // ANY is answered with the A record too: it is every record the name has.
    if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
        // The question's own spelling, not a lowercased one: resolvers that randomise the case
        // of queries (0x20 encoding) reject answers that do not echo it.
        reply.add_answer(Record::from_rdata(
            question.name().clone(),
            VM_TTL_SECONDS,
            RData::A(A(address)),
        ));
    }
    encode(reply)
}

/// A response to a fully parsed query: same id and opcode, RD and CD copied, the question
/// echoed, RA set since we recurse through the upstreams, and an OPT record when the query had
/// one (RFC 6891 requires it).
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::new(query.id, MessageType::Response, query.op_code);
    reply.metadata = Metadata::response_from_request(&query.metadata);
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// A response to a query of which only the header could be read: no question to echo.
fn error_reply(request: &Metadata, code: ResponseCode) -> Message {
    let mut reply = Message::new(request.id, MessageType::Response, request.op_code);
    reply.metadata = Metadata::response_from_request(request);
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply
}

fn encode(reply: Message) -> Decision {
    match reply.to_vec() {
        Ok(bytes) => Decision::Reply(bytes),
        // Only a message we built could fail here, and there is nothing better to send.
        Err(_) => Decision::Drop,
    }
}

/// One forwarded query, owned by its task.
struct Forward {
    /// The client's datagram, sent upstream as is so EDNS options, DO and CD bits survive.
    raw: Vec<u8>,
    query: Message,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    upstream: Arc<[SocketAddr]>,
    timeout: Duration,
}

impl Forward {
    async fn run(self) {
        let id = self.query.id;
        for server in self.upstream.iter().copied() {
            let exchanged = tokio::time::timeout(self.timeout, exchange(&self.raw, id, server));
            if let Ok(Ok(answer)) = exchanged.await {
                let _ = self.socket.send_to(&answer, self.client).await;
                return;
            }
        }
        if let Decision::Reply(reply) = encode(reply_to(&self.query, ResponseCode::ServFail)) {
            let _ = self.socket.send_to(&reply, self.client).await;
        }
    }
}

/// Sends `query` to `server` and waits for its reply with the same id. The socket is fresh, so
/// its port is random (spoofed replies must guess it as well as the id), and connected, so the
/// kernel drops datagrams from any other source and reports an ICMP refusal as an error at once
/// instead of after the timeout.
async fn exchange(query: &[u8], id: u16, server: SocketAddr) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let length = socket.recv(&mut buffer).await?;
        if is_response_with_id(&buffer[..length], id) {
            buffer.truncate(length);
            return Ok(buffer);
        }
    }
}

fn is_response_with_id(packet: &[u8], id: u16) -> bool {
    match packet {
        [high, low, flags, ..] => u16::from_be_bytes([*high, *low]) == id && flags & 0x80 != 0,
        _ => false,
    }
}

impl crate::error::Classify for DnsError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Environment
    }
}

/// `nameserver` entries of a resolv.conf text, as port-53 socket addresses, skipping `exclude`
/// (the bridge address itself, to avoid forwarding loops) and anything unparsable. IPv6
/// nameservers are kept.
pub fn upstream_from_resolv_conf(text: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let mut upstream: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        // glibc reads only the first two fields, so a trailing comment is harmless, but a line
        // starting with `#` or `;` is a comment as a whole.
        let mut fields = line.split_whitespace();
        if fields.next() != Some("nameserver") {
            continue;
        }
        // A zone index (`fe80::1%eth0`) does not parse and such a server is skipped: naming the
        // interface would need if_nametoindex.
        let Some(address) = fields.next().and_then(|field| field.parse::<IpAddr>().ok()) else {
            continue;
        };
        let server = SocketAddr::new(address, 53);
        if exclude.contains(&address) || address.is_unspecified() || upstream.contains(&server) {
            continue;
        }
        upstream.push(server);
    }
    upstream
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;
    use std::time::Instant;

    use hickory_proto::rr::Name;

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

    fn lookup_from_map(names: HashMap<String, Ipv4Addr>) -> Lookup {
        Arc::new(move |name| names.get(name).copied())
    }

    fn web_lookup() -> Lookup {
        lookup_from_map(HashMap::from([
            ("web".to_string(), Ipv4Addr::new(10, 213, 0, 2)),
            ("db".to_string(), Ipv4Addr::new(10, 213, 0, 3)),
        ]))
    }

    fn query_bytes(id: u16, name: &str, record_type: RecordType) -> Vec<u8> {
        let mut query = Message::new(id, MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            record_type,
        ));
        query.to_vec().unwrap()
    }

    struct Running {
        address: SocketAddr,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(upstream: Vec<SocketAddr>, forward_timeout: Duration) -> Running {
        let mut server = DnsServer::bind((LOOPBACK, 0).into(), web_lookup(), upstream)
            .await
            .unwrap();
        server.forward_timeout = forward_timeout;
        let address = server.local_addr();
        assert_eq!(address.ip(), IpAddr::V4(LOOPBACK));
        assert_ne!(address.port(), 0);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.serve(cancel.clone()));
        Running {
            address,
            cancel,
            task,
        }
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind((LOOPBACK, 0)).await.unwrap()
    }

    async fn receive(socket: &UdpSocket, within: Duration) -> Vec<u8> {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let length = tokio::time::timeout(within, socket.recv(&mut buffer))
            .await
            .expect("no reply in time")
            .unwrap();
        buffer.truncate(length);
        buffer
    }

    async fn ask(server: SocketAddr, packet: &[u8]) -> Message {
        let socket = client().await;
        socket.send_to(packet, server).await.unwrap();
        Message::from_vec(&receive(&socket, Duration::from_secs(5)).await).unwrap()
    }

    fn reply_of(packet: &[u8]) -> Message {
        match decide(packet, &web_lookup(), true) {
            Decision::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_query_for_an_existing_vm_is_answered_authoritatively() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        let reply = ask(
            server.address,
            &query_bytes(0x1234, "web.vm.", RecordType::A),
        )
        .await;
        assert_eq!(reply.id, 0x1234);
        assert_eq!(reply.message_type, MessageType::Response);
        assert_eq!(reply.response_code, ResponseCode::NoError);
        assert!(reply.authoritative);
        assert!(reply.recursion_desired);
        assert!(reply.recursion_available);
        assert_eq!(reply.queries.len(), 1);
        assert_eq!(reply.queries[0].name().to_string(), "web.vm.");
        assert_eq!(reply.queries[0].query_type(), RecordType::A);
        assert_eq!(reply.answers.len(), 1);
        let answer = &reply.answers[0];
        assert_eq!(answer.ttl, 5);
        assert_eq!(answer.name.to_string(), "web.vm.");
        assert_eq!(answer.data, RData::A(A(Ipv4Addr::new(10, 213, 0, 2))));
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn names_are_case_insensitive_and_the_question_spelling_is_echoed() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        let reply = ask(server.address, &query_bytes(7, "DB.Vm.", RecordType::A)).await;
        assert_eq!(reply.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(reply.answers[0].name.to_string(), "DB.Vm.");
        assert_eq!(
            reply.answers[0].data,
            RData::A(A(Ipv4Addr::new(10, 213, 0, 3)))
        );
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn aaaa_for_an_existing_vm_is_nodata() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        let reply = ask(server.address, &query_bytes(8, "web.vm.", RecordType::AAAA)).await;
        assert_eq!(reply.id, 8);
        assert_eq!(reply.response_code, ResponseCode::NoError);
        assert!(reply.authoritative);
        assert!(reply.answers.is_empty());
        assert_eq!(reply.queries[0].query_type(), RecordType::AAAA);
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn unknown_and_nested_vm_names_are_nxdomain() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        for name in ["nope.vm.", "a.web.vm.", "a.b.vm."] {
            let reply = ask(server.address, &query_bytes(9, name, RecordType::A)).await;
            assert_eq!(reply.response_code, ResponseCode::NXDomain, "{name}");
            assert!(reply.authoritative, "{name}");
            assert!(reply.answers.is_empty(), "{name}");
        }
        server.cancel.cancel();
    }

    #[test]
    fn the_zone_apex_is_nodata_and_any_returns_the_a_record() {
        let apex = reply_of(&query_bytes(1, "vm.", RecordType::A));
        assert_eq!(apex.response_code, ResponseCode::NoError);
        assert!(apex.authoritative);
        assert!(apex.answers.is_empty());

        let any = reply_of(&query_bytes(2, "web.vm.", RecordType::ANY));
        assert_eq!(any.answers.len(), 1);
        assert_eq!(any.answers[0].record_type(), RecordType::A);
    }

    #[test]
    fn edns_queries_get_an_opt_record_back() {
        let mut query = Message::new(3, MessageType::Query, OpCode::Query);
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("web.vm.").unwrap(),
            RecordType::A,
        ));
        query.set_edns(Edns::new());
        let reply = reply_of(&query.to_vec().unwrap());
        assert_eq!(
            reply.edns.as_ref().map(Edns::max_payload),
            Some(EDNS_PAYLOAD)
        );
        assert_eq!(reply.answers.len(), 1);

        let plain = reply_of(&query_bytes(4, "web.vm.", RecordType::A));
        assert!(plain.edns.is_none());
    }

    #[test]
    fn malformed_and_odd_packets() {
        // Shorter than a header: nothing to answer to.
        assert!(matches!(
            decide(&[0x12, 0x34, 0x01], &web_lookup(), true),
            Decision::Drop
        ));
        // A header claiming a question that is not there: FORMERR with the same id.
        let formerr = reply_of(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]);
        assert_eq!(formerr.id, 0xabcd);
        assert_eq!(formerr.response_code, ResponseCode::FormErr);
        assert!(formerr.recursion_desired);
        // No question at all.
        let empty = reply_of(&[0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(empty.response_code, ResponseCode::FormErr);
        // A response sent to us is never answered.
        let mut response = query_bytes(6, "web.vm.", RecordType::A);
        response[2] |= 0x80;
        assert!(matches!(
            decide(&response, &web_lookup(), true),
            Decision::Drop
        ));
        // Opcodes other than QUERY (here NOTIFY).
        let mut notify = query_bytes(7, "web.vm.", RecordType::A);
        notify[2] = (notify[2] & !0x78) | (4 << 3);
        assert_eq!(reply_of(&notify).response_code, ResponseCode::NotImp);
        // A non-IN class in our zone.
        let mut chaos = query_bytes(8, "web.vm.", RecordType::A);
        let class_at = chaos.len() - 2;
        chaos[class_at..].copy_from_slice(&3u16.to_be_bytes());
        let refused = reply_of(&chaos);
        assert_eq!(refused.response_code, ResponseCode::Refused);
        assert!(refused.answers.is_empty());
    }

    #[test]
    fn names_outside_the_zone_are_forwarded_or_refused() {
        let packet = query_bytes(10, "example.com.", RecordType::A);
        match decide(&packet, &web_lookup(), true) {
            Decision::Forward(query) => assert_eq!(query.id, 10),
            other => panic!("expected a forward, got {other:?}"),
        }
        // `vm` inside a name but not as its last label is not ours.
        let inner = query_bytes(11, "vm.example.com.", RecordType::A);
        assert!(matches!(
            decide(&inner, &web_lookup(), true),
            Decision::Forward(_)
        ));
        let refused = match decide(&packet, &web_lookup(), false) {
            Decision::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        };
        assert_eq!(refused.response_code, ResponseCode::Refused);
        assert_eq!(refused.queries[0].name().to_string(), "example.com.");
    }

    /// Random and mutated packets straight into the decision: a panic fails the test.
    #[test]
    fn decide_survives_random_and_mutated_packets() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let lookup = web_lookup();
        let valid = query_bytes(12, "web.vm.", RecordType::A);
        let mut replies = 0;
        for round in 0..20_000 {
            let packet: Vec<u8> = if round % 2 == 0 {
                let length = (next() % 600) as usize;
                (0..length).map(|_| next() as u8).collect()
            } else {
                let mut packet = valid.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % packet.len();
                    packet[at] = next() as u8;
                }
                packet.truncate(1 + (next() as usize) % (packet.len() + 8));
                packet
            };
            if let Decision::Reply(_) = decide(&packet, &lookup, round % 3 == 0) {
                replies += 1;
            }
        }
        // The mutated half mostly still parses: the test did reach the answering code.
        assert!(replies > 1_000, "only {replies} replies");
    }

    #[tokio::test]
    async fn garbage_does_not_kill_the_server() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        let noise = client().await;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for length in 0..300usize {
            let packet: Vec<u8> = (0..length)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            noise.send_to(&packet, server.address).await.unwrap();
        }
        let reply = ask(server.address, &query_bytes(13, "web.vm.", RecordType::A)).await;
        assert_eq!(reply.id, 13);
        assert_eq!(reply.answers.len(), 1);
        assert!(!server.task.is_finished());
        server.cancel.cancel();
    }

    /// A fake resolver on loopback: answers each query with a canned A record, optionally after
    /// a reply with the wrong id, and reports what it received and sent.
    async fn fake_upstream(
        wrong_id_first: bool,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, Vec<u8>)>,
    ) {
        let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let address = socket.local_addr().unwrap();
        let (report, reports) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            while let Ok((length, from)) = socket.recv_from(&mut buffer).await {
                let received = buffer[..length].to_vec();
                let query = Message::from_vec(&received).unwrap();
                let mut answer = reply_to(&query, ResponseCode::NoError);
                answer.add_answer(Record::from_rdata(
                    query.queries[0].name().clone(),
                    300,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 80))),
                ));
                let canned = answer.to_vec().unwrap();
                if wrong_id_first {
                    let mut wrong = canned.clone();
                    wrong[0] ^= 0xff;
                    socket.send_to(&wrong, from).await.unwrap();
                }
                socket.send_to(&canned, from).await.unwrap();
                if report.send((received, canned)).is_err() {
                    break;
                }
            }
        });
        (address, reports)
    }

    #[tokio::test]
    async fn other_names_are_relayed_byte_for_byte() {
        let (upstream, mut reports) = fake_upstream(true).await;
        let server = start(vec![upstream], FORWARD_TIMEOUT).await;
        let query = query_bytes(0x4242, "example.com.", RecordType::A);
        let socket = client().await;
        socket.send_to(&query, server.address).await.unwrap();
        let relayed = receive(&socket, Duration::from_secs(5)).await;
        let (received, sent) = reports.recv().await.unwrap();
        assert_eq!(received, query, "the upstream got the client's bytes");
        assert_eq!(relayed, sent, "the client got the upstream's bytes");
        let answer = Message::from_vec(&relayed).unwrap();
        assert_eq!(answer.id, 0x4242);
        assert_eq!(answer.answers[0].ttl, 300);
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn a_silent_upstream_is_skipped_for_the_next() {
        let silent = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let (answering, mut reports) = fake_upstream(false).await;
        let server = start(
            vec![silent.local_addr().unwrap(), answering],
            Duration::from_millis(200),
        )
        .await;
        let query = query_bytes(21, "example.org.", RecordType::A);
        let socket = client().await;
        socket.send_to(&query, server.address).await.unwrap();
        let relayed = receive(&socket, Duration::from_secs(3)).await;
        let (_, sent) = reports.recv().await.unwrap();
        assert_eq!(relayed, sent);
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn a_silent_upstream_gives_servfail_after_the_timeout() {
        let silent = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let server = start(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(200),
        )
        .await;
        let started = Instant::now();
        let reply = ask(
            server.address,
            &query_bytes(22, "example.net.", RecordType::A),
        )
        .await;
        let waited = started.elapsed();
        assert_eq!(reply.id, 22);
        assert_eq!(reply.response_code, ResponseCode::ServFail);
        assert_eq!(reply.queries[0].name().to_string(), "example.net.");
        assert!(!reply.authoritative);
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn a_pending_forward_does_not_hold_up_vm_answers() {
        let silent = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let server = start(vec![silent.local_addr().unwrap()], FORWARD_TIMEOUT).await;
        let forwarded = client().await;
        forwarded
            .send_to(
                &query_bytes(23, "slow.example.", RecordType::A),
                server.address,
            )
            .await
            .unwrap();
        let started = Instant::now();
        let reply = ask(server.address, &query_bytes(24, "web.vm.", RecordType::A)).await;
        assert_eq!(reply.answers.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        let servfail = Message::from_vec(&receive(&forwarded, Duration::from_secs(5)).await);
        assert_eq!(servfail.unwrap().response_code, ResponseCode::ServFail);
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn no_upstream_means_refused() {
        let server = start(Vec::new(), FORWARD_TIMEOUT).await;
        let reply = ask(
            server.address,
            &query_bytes(25, "example.com.", RecordType::A),
        )
        .await;
        assert_eq!(reply.id, 25);
        assert_eq!(reply.response_code, ResponseCode::Refused);
        server.cancel.cancel();
    }

    #[tokio::test]
    async fn cancel_stops_serving_and_releases_the_address() {
        let silent = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let server = start(vec![silent.local_addr().unwrap()], FORWARD_TIMEOUT).await;
        // A forward in flight holds a clone of the socket until serve aborts it.
        let socket = client().await;
        socket
            .send_to(
                &query_bytes(26, "pending.example.", RecordType::A),
                server.address,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), server.task)
            .await
            .expect("serve did not return")
            .unwrap();
        let rebound = DnsServer::bind(server.address, web_lookup(), Vec::new()).await;
        assert_eq!(rebound.unwrap().local_addr(), server.address);
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let address = taken.local_addr().unwrap();
        let error = DnsServer::bind(address, web_lookup(), Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(error, DnsError::Bind { address: at, .. } if at == address));
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "\
# Generated by NetworkManager
; an old-style comment
search example.lan
options edns0 trust-ad
nameserver 10.213.0.1
nameserver 192.168.1.1   # trailing comment
  nameserver\t1.1.1.1
#nameserver 8.8.8.8
nameserver 2001:db8::53
nameserver fe80::1%eth0
nameserver not-an-address
nameserver
nameserver 0.0.0.0
nameserver 192.168.1.1
nameservers 9.9.9.9
";
        let upstream = upstream_from_resolv_conf(text, &[IpAddr::V4(Ipv4Addr::new(10, 213, 0, 1))]);
        let expected: Vec<SocketAddr> = vec![
            "192.168.1.1:53".parse().unwrap(),
            "1.1.1.1:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
        ];
        assert_eq!(upstream, expected);
        assert!(upstream_from_resolv_conf("", &[]).is_empty());
        assert_eq!(
            upstream_from_resolv_conf("nameserver 127.0.0.53\n", &[]),
            vec!["127.0.0.53:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn only_responses_with_the_right_id_are_accepted() {
        assert!(is_response_with_id(&[0x12, 0x34, 0x81, 0x80], 0x1234));
        assert!(!is_response_with_id(&[0x12, 0x34, 0x01, 0x00], 0x1234));
        assert!(!is_response_with_id(&[0x12, 0x35, 0x81, 0x80], 0x1234));
        assert!(!is_response_with_id(&[0x12, 0x34], 0x1234));
    }
}
