//! The sandbox's DNS server (UDP and TCP).
//!
//! Guarantees:
//! - It never forwards a query anywhere: names the policy allows (on some port) get a synthetic
//!   address from 198.18.0.0/15 for A and an empty NOERROR (NODATA) for AAAA (the sandbox has no
//!   IPv6); every other name gets NXDOMAIN. So a name carrying data (`<secret>.evil.com`) reaches
//!   no nameserver, and there is no real address to rebind.
//! - Query types other than A/AAAA get REFUSED, opcodes other than QUERY get NOTIMP, queries with
//!   zero or several questions get FORMERR, undecodable messages get FORMERR when their id can be
//!   read and are dropped otherwise.
//! - Every query that names a host produces exactly one `DnsQuery` event.
//! - The answer logic is a pure function ([`answer`]) of the query bytes, the policy and the
//!   synthetic map; the servers around it only move bytes.

use std::net::IpAddr;
use std::sync::Arc;

use cordon_policy::host::HostName;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::core::Ctx;
use crate::event::{EventKind, NetEvent, Verdict, Via};
use crate::policy::{PolicyView, Verdicted};
use crate::session::Session;
use crate::synthetic::SyntheticMap;

/// TTL of synthetic answers. The mapping holds for the whole session, so a long TTL is safe.
const SYNTHETIC_TTL: u32 = 300;
/// DNS-over-TCP connections served at once.
const MAX_TCP_CLIENTS: usize = 64;

/// What the DNS server decided for one query (the event, minus attribution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsOutcome {
    pub name: String,
    pub qtype: RecordType,
    pub verdict: Verdict,
    pub rule: String,
    pub reason: Option<String>,
    pub answer: Option<IpAddr>,
}

/// Builds the response to the query in `bytes`. `None` means drop (not even an id to answer).
pub(crate) fn answer(
    bytes: &[u8],
    policy: &PolicyView,
    synthetic: &SyntheticMap,
) -> (Option<Vec<u8>>, Option<DnsOutcome>) {
    let query = match Message::from_vec(bytes) {
        Ok(q) => q,
        Err(_) => {
            // Answer FORMERR if the header at least has an id.
            if bytes.len() >= 2 {
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                let msg = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return (msg.to_vec().ok(), None);
            }
            return (None, None);
        }
    };
    if query.metadata.message_type != MessageType::Query {
        return (None, None);
    }
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        resp.set_edns(edns);
    }
    if query.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return (resp.to_vec().ok(), None);
    }
    let [question] = query.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return (resp.to_vec().ok(), None);
    };
    resp.add_query(question.clone());
    let qtype = question.query_type;
    let shown = question.name.to_ascii();
    let shown = shown.strip_suffix('.').unwrap_or(&shown).to_owned();
    let mut outcome = DnsOutcome {
        name: shown.clone(),
        qtype,
        verdict: Verdict::Block,
        rule: String::new(),
        reason: None,
        answer: None,
    };

    let name = match HostName::parse(&shown) {
        Ok(n) => n,
        Err(e) => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            outcome.rule = "dns:invalid-name".into();
            outcome.reason = Some(e.to_string());
            return (resp.to_vec().ok(), Some(outcome));
        }
    };
    outcome.name = name.to_string();
    let v: Verdicted = policy.decide_dns_name(&name);
    outcome.rule = v.rule.clone();
    outcome.reason = v.reason.clone();
    outcome.verdict = v.verdict;
    if v.verdict == Verdict::Block {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return (resp.to_vec().ok(), Some(outcome));
    }
    match qtype {
        RecordType::A => match synthetic.assign(&name) {
            Ok(ip) => {
                outcome.answer = Some(IpAddr::V4(ip));
                resp.add_answer(Record::from_rdata(
                    question.name.clone(),
                    SYNTHETIC_TTL,
                    RData::A(A(ip)),
                ));
            }
            Err(e) => {
                resp.metadata.response_code = ResponseCode::ServFail;
                outcome.verdict = Verdict::Block;
                outcome.rule = "dns:synthetic-exhausted".into();
                outcome.reason = Some(e.to_string());
            }
        },
        // NODATA: the name exists (for this sandbox) but has no IPv6 address.
        RecordType::AAAA => {}
        other => {
            resp.metadata.response_code = ResponseCode::Refused;
            outcome.verdict = Verdict::Block;
            outcome.rule = "dns:qtype".into();
            outcome.reason = Some(format!("query type {other} is not answered"));
        }
    }
    (resp.to_vec().ok(), Some(outcome))
}

fn emit(ctx: &Ctx, session: &Session, o: DnsOutcome) {
    let mut e = NetEvent::new(EventKind::DnsQuery, &session.info, Via::Dns, o.verdict);
    e.host = Some(o.name);
    e.ip = o.answer;
    e.method = Some(o.qtype.to_string());
    e.rule = o.rule;
    e.reason = o.reason;
    ctx.emit(session, e);
}

fn handle(ctx: &Ctx, session: &Session, bytes: &[u8]) -> Option<Vec<u8>> {
    // A credential placeholder (or secret, canary) in a query name is exfiltration by DNS:
    // refused before the name is decided, so no allowed wildcard can answer it.
    if let Some(rt) = ctx.shared.intercept.as_deref() {
        if let Some(f) = rt.leak_in(bytes) {
            crate::intercept::alert(ctx, session, Via::Dns, None, None, None, &f);
            let mut e = NetEvent::new(EventKind::DnsQuery, &session.info, Via::Dns, Verdict::Block);
            e.rule = format!("dns:{}", f.pattern);
            e.reason = Some("a query name carried a credential placeholder or secret".into());
            ctx.emit(session, e);
            if bytes.len() < 2 {
                return None;
            }
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::NXDomain)
                .to_vec()
                .ok();
        }
    }
    let (resp, outcome) = answer(bytes, &ctx.shared.policy, &ctx.shared.synthetic);
    if let Some(o) = outcome {
        emit(ctx, session, o);
    }
    resp
}

pub(crate) async fn serve_udp(ctx: Arc<Ctx>, session: Arc<Session>, socket: UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns udp recv");
                    continue;
                }
            },
            _ = ctx.cancel.cancelled() => return,
        };
        let owner = match &ctx.shared.owners {
            Some(owners) => {
                crate::owner::look_up(owners, crate::owner::Transport::Udp, peer, None).await
            }
            None => None,
        };
        if let Some(resp) = crate::owner::sync_with(owner, || handle(&ctx, &session, &buf[..n])) {
            // Responses to A/AAAA are far below 512 bytes; no truncation logic is needed.
            if let Err(e) = socket.send_to(&resp, peer).await {
                tracing::debug!(error = %e, "dns udp send");
            }
        }
    }
}

pub(crate) async fn serve_tcp(ctx: Arc<Ctx>, session: Arc<Session>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns tcp accept");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = ctx.cancel.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Too many idle DNS connections: drop this one rather than queue it.
            continue;
        };
        let (stream, client) = stream;
        let ctx2 = ctx.clone();
        let session = session.clone();
        ctx.tasks.spawn(async move {
            let _permit = permit;
            let owners = ctx2.shared.owners.clone();
            // A query redirected to this listener: the client's socket is connected to the
            // nameserver it meant to ask.
            let server = owners.as_ref().and_then(|_| {
                ctx2.shared
                    .original_dst
                    .original_dst(&stream)
                    .or_else(|_| stream.local_addr())
                    .ok()
            });
            let served = crate::owner::with_owner(
                owners,
                crate::owner::Transport::Tcp,
                Some(client),
                server,
                tcp_client(&ctx2, &session, stream),
            );
            tokio::select! {
                _ = served => {}
                _ = ctx2.cancel.cancelled() => {}
            }
        });
    }
}

async fn tcp_client(ctx: &Ctx, session: &Session, mut stream: TcpStream) {
    let idle = ctx.shared.timeouts.dns_tcp_idle;
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = usize::from(u16::from_be_bytes(len));
        let mut msg = vec![0u8; len];
        match tokio::time::timeout(idle, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(resp) = handle(ctx, session, &msg) else {
            return;
        };
        let Ok(rlen) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = rlen.to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_policy::{AllowEntry, Enforcement, NetworkPolicy};
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::net::Ipv4Addr;

    fn view(allow: &[&str], mode: Enforcement) -> PolicyView {
        PolicyView::new(NetworkPolicy {
            mode,
            allow: allow
                .iter()
                .map(|a| AllowEntry::parse(a).unwrap())
                .collect(),
            ..NetworkPolicy::default()
        })
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn run(p: &PolicyView, map: &SyntheticMap, bytes: &[u8]) -> (Message, Option<DnsOutcome>) {
        let (resp, outcome) = answer(bytes, p, map);
        (Message::from_vec(&resp.unwrap()).unwrap(), outcome)
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_allowed_name_gets_a_stable_synthetic_address() {
        let p = view(&["api.github.com"], Enforcement::Enforce);
        let map = SyntheticMap::new();
        let (m, o) = run(&p, &map, &query("API.github.com.", RecordType::A));
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let first = a_records(&m);
        assert_eq!(first, vec![Ipv4Addr::new(198, 18, 0, 1)]);
        let o = o.unwrap();
        assert_eq!(
            (o.verdict, o.rule.as_str(), o.name.as_str()),
            (Verdict::Allow, "api.github.com", "api.github.com")
        );
        let (m2, _) = run(&p, &map, &query("api.github.com", RecordType::A));
        assert_eq!(a_records(&m2), first);
    }

    #[test]
    fn a_name_allowed_only_on_another_port_still_resolves() {
        let p = view(&["git.example.com:22"], Enforcement::Enforce);
        let map = SyntheticMap::new();
        let (m, _) = run(&p, &map, &query("git.example.com", RecordType::A));
        assert_eq!(a_records(&m).len(), 1);
    }

    #[test]
    fn aaaa_for_an_allowed_name_is_nodata() {
        let p = view(&["api.github.com"], Enforcement::Enforce);
        let (m, o) = run(
            &p,
            &SyntheticMap::new(),
            &query("api.github.com", RecordType::AAAA),
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(o.unwrap().verdict, Verdict::Allow);
    }

    #[test]
    fn other_names_get_nxdomain_and_a_block_event() {
        let p = view(&["api.github.com"], Enforcement::Enforce);
        let map = SyntheticMap::new();
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
            let (m, o) = run(&p, &map, &query("secret-data.evil.com", qtype));
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{qtype}");
            let o = o.unwrap();
            assert_eq!(o.verdict, Verdict::Block);
            assert_eq!(o.rule, "default-deny");
            assert_eq!(
                o.reason.as_deref(),
                Some("host secret-data.evil.com is not in the allowlist")
            );
        }
        assert!(map.is_empty());
    }

    #[test]
    fn other_query_types_for_allowed_names_are_refused() {
        let p = view(&["api.github.com"], Enforcement::Enforce);
        for qtype in [
            RecordType::TXT,
            RecordType::MX,
            RecordType::ANY,
            RecordType::PTR,
        ] {
            let (m, o) = run(&p, &SyntheticMap::new(), &query("api.github.com", qtype));
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{qtype}");
            assert_eq!(o.unwrap().verdict, Verdict::Block);
        }
    }

    #[test]
    fn report_mode_answers_every_valid_name_and_records_it_would_block() {
        let p = view(&[], Enforcement::Report);
        let (m, o) = run(
            &p,
            &SyntheticMap::new(),
            &query("example.com", RecordType::A),
        );
        assert_eq!(a_records(&m).len(), 1);
        assert_eq!(o.unwrap().verdict, Verdict::ReportWouldBlock);
    }

    #[test]
    fn ip_like_names_are_nxdomain() {
        let p = view(&[], Enforcement::Report);
        let (m, o) = run(
            &p,
            &SyntheticMap::new(),
            &query("169.254.169.254", RecordType::A),
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(o.unwrap().rule, "dns:invalid-name");
    }

    #[test]
    fn malformed_messages_get_formerr_or_nothing() {
        let p = view(&[], Enforcement::Enforce);
        let map = SyntheticMap::new();
        let (resp, o) = answer(&[0x12, 0x34, 0xff], &p, &map);
        let m = Message::from_vec(&resp.unwrap()).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x1234, ResponseCode::FormErr)
        );
        assert!(o.is_none());
        assert_eq!(answer(&[0x12], &p, &map), (None, None));

        let mut two = Message::query();
        two.add_query(Query::query(
            Name::from_ascii("a.com").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.com").unwrap(),
            RecordType::A,
        ));
        let (m, o) = run(&p, &map, &two.to_vec().unwrap());
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(o.is_none());
    }

    proptest::proptest! {
        #[test]
        fn answering_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let p = view(&["api.github.com"], Enforcement::Enforce);
            let _ = answer(&bytes, &p, &SyntheticMap::new());
        }

        #[test]
        fn only_allowed_names_ever_get_an_address(label in "[a-z0-9][a-z0-9-]{0,19}", qtype in 0u16..300) {
            let p = view(&["api.github.com"], Enforcement::Enforce);
            let map = SyntheticMap::new();
            let name = format!("{label}.example.com");
            let (resp, _) = answer(&query(&name, RecordType::from(qtype)), &p, &map);
            if let Some(resp) = resp {
                let m = Message::from_vec(&resp).unwrap();
                proptest::prop_assert!(m.answers.is_empty());
            }
            proptest::prop_assert!(map.is_empty());
        }
    }

    #[test]
    fn an_exhausted_synthetic_range_answers_servfail() {
        let p = view(&["*.example.com"], Enforcement::Enforce);
        let map = SyntheticMap::with_capacity(1);
        run(&p, &map, &query("a.example.com", RecordType::A));
        let (m, o) = run(&p, &map, &query("b.example.com", RecordType::A));
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(o.unwrap().verdict, Verdict::Block);
    }
}
