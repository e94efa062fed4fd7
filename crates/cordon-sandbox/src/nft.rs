//! A small netlink message builder and parser, and the nftables messages cordon needs.
//!
//! Guarantees:
//! - Pure: nothing here makes a syscall. [`crate::netns`] sends the bytes and reads the replies.
//! - A [`Table`] is encoded as one nfnetlink batch (`NFNL_MSG_BATCH_BEGIN` … `END`), so the kernel
//!   applies the whole table or none of it; there is never a half-installed capture.
//! - Every message in a batch asks for an acknowledgement and carries its own sequence number, and
//!   [`Batch::describe`] names the step a sequence number belongs to (`rule 3 of chain egress`),
//!   so a kernel error is reported against the rule that caused it.
//! - Only the expressions cordon uses exist ([`Expr`]); all of them load into or read from
//!   register 1, which is enough for "match some fields, then act".
//! - The parsers never panic and never read past the buffer: a malformed reply is an
//!   [`NftError`].
//!
//! Written from the uapi headers (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
//! `linux/netfilter/nf_tables.h`); `rustables` is GPL and is not used.

use serde::Serialize;

/// Errors from encoding a message or decoding a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NftError {
    /// A table, chain or object name is empty, too long, or contains a NUL byte.
    #[error("nftables name {name:?} is invalid (1 to {max} bytes, no NUL)")]
    BadName { name: String, max: usize },
    /// A message or nested attribute would not fit netlink's 16/32-bit length fields.
    #[error("netlink {what} is {len} bytes, larger than netlink allows")]
    TooLong { what: &'static str, len: usize },
    /// A reply was cut short or its lengths do not add up.
    #[error("malformed netlink reply: {what}")]
    Malformed { what: &'static str },
}

// ---- netlink framing (linux/netlink.h) ----

pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);

// ---- nfnetlink (linux/netfilter/nfnetlink.h, linux/netfilter.h) ----

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
/// `meta nfproto` value for IPv4.
pub const NFPROTO_IPV4: u8 = 2;
/// `meta nfproto` value for IPv6.
pub const NFPROTO_IPV6: u8 = 10;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

// ---- nf_tables (linux/netfilter/nf_tables.h) ----

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_OBJREF_IMM_TYPE: u16 = 1;
const NFTA_OBJREF_IMM_NAME: u16 = 2;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
/// `NFT_NAME_MAXLEN` counts the terminating NUL.
const NFT_NAME_MAXLEN: usize = 256;

const fn nft_type(msg: u16) -> u16 {
    NFNL_SUBSYS_NFTABLES << 8 | msg
}

// ---- a netlink message writer ----

/// Appends netlink messages and attributes to one buffer, patching lengths when a message or a
/// nest is closed. Attributes are padded to 4 bytes as netlink requires.
#[derive(Debug, Default)]
pub(crate) struct NlBuf {
    buf: Vec<u8>,
}

impl NlBuf {
    pub(crate) fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
        }
    }

    /// Starts a message; returns its offset for [`NlBuf::end`].
    pub(crate) fn begin(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by end()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        start
    }

    pub(crate) fn end(&mut self, start: usize) -> Result<(), NftError> {
        let len = self.buf.len() - start;
        let len32 = u32::try_from(len).map_err(|_| NftError::TooLong {
            what: "message",
            len,
        })?;
        self.buf[start..start + 4].copy_from_slice(&len32.to_ne_bytes());
        self.pad();
        Ok(())
    }

    /// ORs `flag` into the flags of the message that starts at `start`.
    pub(crate) fn set_flag(&mut self, start: usize, flag: u16) {
        if let Some(f) = self.buf.get_mut(start + 6..start + 8) {
            let v = u16::from_ne_bytes([f[0], f[1]]) | flag;
            f.copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// Raw bytes (a fixed family header such as `nfgenmsg` or `ifinfomsg`); padded to 4.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    pub(crate) fn attr(&mut self, ty: u16, payload: &[u8]) -> Result<(), NftError> {
        let len = NLA_HDRLEN + payload.len();
        let len16 = u16::try_from(len).map_err(|_| NftError::TooLong {
            what: "attribute",
            len,
        })?;
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        Ok(())
    }

    /// A 32-bit attribute in network byte order (what nf_tables uses for every integer).
    fn attr_be32(&mut self, ty: u16, v: u32) -> Result<(), NftError> {
        self.attr(ty, &v.to_be_bytes())
    }

    pub(crate) fn attr_ne32(&mut self, ty: u16, v: u32) -> Result<(), NftError> {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    fn attr_strz(&mut self, ty: u16, s: &str) -> Result<(), NftError> {
        let len = NLA_HDRLEN + s.len() + 1;
        let len16 = u16::try_from(len).map_err(|_| NftError::TooLong {
            what: "attribute",
            len,
        })?;
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
        Ok(())
    }

    fn nest_begin(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn nest_end(&mut self, start: usize) -> Result<(), NftError> {
        let len = self.buf.len() - start;
        let len16 = u16::try_from(len).map_err(|_| NftError::TooLong {
            what: "nested attribute",
            len,
        })?;
        self.buf[start..start + 2].copy_from_slice(&len16.to_ne_bytes());
        Ok(())
    }

    fn pad(&mut self) {
        let len = self.buf.len();
        self.buf.resize(align4(len), 0);
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

// ---- a netlink reply reader ----

/// One message of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NlMsg<'a> {
    pub ty: u16,
    pub seq: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

/// Splits a datagram read from a netlink socket into messages.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<NlMsg<'_>, NftError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let Some(hdr) = buf.get(..NLMSG_HDRLEN) else {
            buf = &[];
            return Some(Err(NftError::Malformed {
                what: "short message header",
            }));
        };
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            buf = &[];
            return Some(Err(NftError::Malformed {
                what: "message length",
            }));
        }
        let msg = NlMsg {
            ty: u16::from_ne_bytes([hdr[4], hdr[5]]),
            seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    })
}

/// The errno of an `NLMSG_ERROR` message's payload: 0 for an acknowledgement, otherwise a
/// positive errno.
pub(crate) fn ack_errno(payload: &[u8]) -> Result<i32, NftError> {
    let b = payload.get(..4).ok_or(NftError::Malformed {
        what: "short NLMSG_ERROR",
    })?;
    Ok(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Iterates over the attributes in `buf` as (type without flags, payload).
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NftError>> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            // Trailing padding shorter than a header is not an attribute.
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            buf = &[];
            return Some(Err(NftError::Malformed {
                what: "attribute length",
            }));
        }
        let payload = &buf[NLA_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty, payload)))
    })
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

// ---- the nftables model ----

/// What `meta` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaKey {
    /// The packet's netfilter family (`meta nfproto`): [`NFPROTO_IPV4`] or [`NFPROTO_IPV6`].
    NfProto,
    /// The transport protocol number (`meta l4proto`).
    L4Proto,
}

/// Where `payload` reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadBase {
    Network,
    Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    Neq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accept,
    Drop,
}

/// One nftables expression. Loads write register 1; `Cmp` and `Redirect` read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    /// `meta load <key> => reg 1`
    Meta(MetaKey),
    /// `payload load <len>b @ <base> header + <offset> => reg 1`
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
    },
    /// `cmp <op> reg 1 <data>`; the data are compared byte for byte, so integers are big-endian
    /// exactly as they sit in the packet.
    Cmp { op: CmpOp, data: Vec<u8> },
    /// `immediate reg 1 <data>`
    Immediate(Vec<u8>),
    /// `redir proto_min reg 1`: redirect to the local port held in register 1 (big-endian).
    Redirect,
    /// `objref type counter name <name>`: count the packet in a named counter.
    CounterRef(String),
    /// `immediate reg 0 <verdict>`
    Verdict(Verdict),
}

/// The kind of base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainType {
    Filter,
    Nat,
}

impl ChainType {
    fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

/// A base chain on the `output` hook (locally generated packets: all a sandbox can send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub name: String,
    pub chain_type: ChainType,
    pub priority: i32,
    pub policy: Verdict,
    /// Each rule is a list of expressions evaluated in order.
    pub rules: Vec<Vec<Expr>>,
}

/// An `inet` table with named counters and output chains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub name: String,
    pub counters: Vec<String>,
    pub chains: Vec<Chain>,
}

/// Which part of a [`Table`] a batch message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Table,
    Counter(usize),
    Chain(usize),
    Rule { chain: usize, index: usize },
}

/// An encoded batch plus the map from sequence numbers back to steps.
#[derive(Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    first_seq: u32,
    steps: Vec<Step>,
}

impl Batch {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Sequence numbers of the table's messages (between batch begin and end); only the last
    /// asks for an acknowledgement, errors come back for any of them.
    pub fn seqs(&self) -> std::ops::RangeInclusive<u32> {
        let n = u32::try_from(self.steps.len()).unwrap_or(u32::MAX);
        self.first_seq..=self.first_seq.wrapping_add(n.saturating_sub(1))
    }

    /// Names the step a sequence number belongs to, for error messages.
    pub fn describe(&self, table: &Table, seq: u32) -> String {
        let idx = seq.wrapping_sub(self.first_seq) as usize;
        match self.steps.get(idx) {
            Some(Step::Table) => format!("nftables: add table inet {}", table.name),
            Some(Step::Counter(i)) => format!(
                "nftables: add counter {}",
                table.counters.get(*i).map(String::as_str).unwrap_or("?")
            ),
            Some(Step::Chain(i)) => format!(
                "nftables: add chain {}",
                table.chains.get(*i).map(|c| c.name.as_str()).unwrap_or("?")
            ),
            Some(Step::Rule { chain, index }) => format!(
                "nftables: add rule {} of chain {}",
                index + 1,
                table
                    .chains
                    .get(*chain)
                    .map(|c| c.name.as_str())
                    .unwrap_or("?")
            ),
            None => format!("nftables: batch message with sequence number {seq}"),
        }
    }
}

fn check_name(name: &str) -> Result<(), NftError> {
    if name.is_empty() || name.len() >= NFT_NAME_MAXLEN || name.contains('\0') {
        return Err(NftError::BadName {
            name: name.to_owned(),
            max: NFT_NAME_MAXLEN - 1,
        });
    }
    Ok(())
}

/// `struct nfgenmsg`: family, version, resource id (big-endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0 /* NFNETLINK_V0 */, r[0], r[1]]
}

/// Encodes `table` as one transaction: batch begin, the table, its counters, chains and rules,
/// batch end. Sequence numbers start at `first_seq` for the batch-begin message; the table and
/// everything in it use the following ones. Only the last of those carries `NLM_F_ACK`: the
/// kernel reports an error for any message regardless, and one ack is cheaper than one per
/// message.
pub fn encode_table_batch(table: &Table, first_seq: u32) -> Result<Batch, NftError> {
    check_name(&table.name)?;
    let mut b = NlBuf::with_capacity(4096);
    let mut steps = Vec::with_capacity(1 + table.counters.len() + table.chains.len() * 8);
    let mut seq = first_seq;
    let mut next = || {
        let s = seq;
        seq = seq.wrapping_add(1);
        s
    };

    let m = b.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next());
    b.put(&nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES));
    b.end(m)?;
    let acked_from = first_seq.wrapping_add(1);

    // NLM_F_ACK is added to the last message once it is known.
    let ack = NLM_F_REQUEST;
    // EXCL: installing twice is a bug (rules would be appended twice), so it must fail loudly.
    let m = b.begin(
        nft_type(NFT_MSG_NEWTABLE),
        ack | NLM_F_CREATE | NLM_F_EXCL,
        next(),
    );
    b.put(&nfgenmsg(NFPROTO_INET, 0));
    b.attr_strz(NFTA_TABLE_NAME, &table.name)?;
    b.end(m)?;
    let mut last_start = m;
    steps.push(Step::Table);

    for (i, counter) in table.counters.iter().enumerate() {
        check_name(counter)?;
        let m = b.begin(
            nft_type(NFT_MSG_NEWOBJ),
            ack | NLM_F_CREATE | NLM_F_EXCL,
            next(),
        );
        b.put(&nfgenmsg(NFPROTO_INET, 0));
        b.attr_strz(NFTA_OBJ_TABLE, &table.name)?;
        b.attr_strz(NFTA_OBJ_NAME, counter)?;
        b.attr_be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER)?;
        let data = b.nest_begin(NFTA_OBJ_DATA);
        b.attr(NFTA_COUNTER_BYTES, &0u64.to_be_bytes())?;
        b.attr(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes())?;
        b.nest_end(data)?;
        b.end(m)?;
        last_start = m;
        steps.push(Step::Counter(i));
    }

    for (ci, chain) in table.chains.iter().enumerate() {
        check_name(&chain.name)?;
        let m = b.begin(
            nft_type(NFT_MSG_NEWCHAIN),
            ack | NLM_F_CREATE | NLM_F_EXCL,
            next(),
        );
        b.put(&nfgenmsg(NFPROTO_INET, 0));
        b.attr_strz(NFTA_CHAIN_TABLE, &table.name)?;
        b.attr_strz(NFTA_CHAIN_NAME, &chain.name)?;
        let hook = b.nest_begin(NFTA_CHAIN_HOOK);
        b.attr_be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT)?;
        b.attr(NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes())?;
        b.nest_end(hook)?;
        b.attr_be32(NFTA_CHAIN_POLICY, verdict_code(chain.policy))?;
        b.attr_strz(NFTA_CHAIN_TYPE, chain.chain_type.name())?;
        b.end(m)?;
        last_start = m;
        steps.push(Step::Chain(ci));

        for (ri, rule) in chain.rules.iter().enumerate() {
            let m = b.begin(
                nft_type(NFT_MSG_NEWRULE),
                ack | NLM_F_CREATE | NLM_F_APPEND,
                next(),
            );
            b.put(&nfgenmsg(NFPROTO_INET, 0));
            b.attr_strz(NFTA_RULE_TABLE, &table.name)?;
            b.attr_strz(NFTA_RULE_CHAIN, &chain.name)?;
            let list = b.nest_begin(NFTA_RULE_EXPRESSIONS);
            for expr in rule {
                encode_expr(&mut b, expr)?;
            }
            b.nest_end(list)?;
            b.end(m)?;
            last_start = m;
            steps.push(Step::Rule {
                chain: ci,
                index: ri,
            });
        }
    }

    b.set_flag(last_start, NLM_F_ACK);

    let m = b.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next());
    b.put(&nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES));
    b.end(m)?;

    Ok(Batch {
        bytes: b.into_bytes(),
        first_seq: acked_from,
        steps,
    })
}

fn verdict_code(v: Verdict) -> u32 {
    match v {
        Verdict::Accept => NF_ACCEPT,
        Verdict::Drop => NF_DROP,
    }
}

fn encode_expr(b: &mut NlBuf, expr: &Expr) -> Result<(), NftError> {
    let elem = b.nest_begin(NFTA_LIST_ELEM);
    let name = match expr {
        Expr::Meta(_) => "meta",
        Expr::Payload { .. } => "payload",
        Expr::Cmp { .. } => "cmp",
        Expr::Immediate(_) | Expr::Verdict(_) => "immediate",
        Expr::Redirect => "redir",
        Expr::CounterRef(_) => "objref",
    };
    b.attr_strz(NFTA_EXPR_NAME, name)?;
    let data = b.nest_begin(NFTA_EXPR_DATA);
    match expr {
        Expr::Meta(key) => {
            let key = match key {
                MetaKey::NfProto => NFT_META_NFPROTO,
                MetaKey::L4Proto => NFT_META_L4PROTO,
            };
            b.attr_be32(NFTA_META_KEY, key)?;
            b.attr_be32(NFTA_META_DREG, NFT_REG_1)?;
        }
        Expr::Payload { base, offset, len } => {
            let base = match base {
                PayloadBase::Network => NFT_PAYLOAD_NETWORK_HEADER,
                PayloadBase::Transport => NFT_PAYLOAD_TRANSPORT_HEADER,
            };
            b.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1)?;
            b.attr_be32(NFTA_PAYLOAD_BASE, base)?;
            b.attr_be32(NFTA_PAYLOAD_OFFSET, *offset)?;
            b.attr_be32(NFTA_PAYLOAD_LEN, *len)?;
        }
        Expr::Cmp { op, data } => {
            let op = match op {
                CmpOp::Eq => NFT_CMP_EQ,
                CmpOp::Neq => NFT_CMP_NEQ,
            };
            b.attr_be32(NFTA_CMP_SREG, NFT_REG_1)?;
            b.attr_be32(NFTA_CMP_OP, op)?;
            let d = b.nest_begin(NFTA_CMP_DATA);
            b.attr(NFTA_DATA_VALUE, data)?;
            b.nest_end(d)?;
        }
        Expr::Immediate(value) => {
            b.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_1)?;
            let d = b.nest_begin(NFTA_IMMEDIATE_DATA);
            b.attr(NFTA_DATA_VALUE, value)?;
            b.nest_end(d)?;
        }
        Expr::Verdict(v) => {
            b.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)?;
            let d = b.nest_begin(NFTA_IMMEDIATE_DATA);
            let verdict = b.nest_begin(NFTA_DATA_VERDICT);
            b.attr_be32(NFTA_VERDICT_CODE, verdict_code(*v))?;
            b.nest_end(verdict)?;
            b.nest_end(d)?;
        }
        Expr::Redirect => {
            b.attr_be32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1)?;
            b.attr_be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED)?;
        }
        Expr::CounterRef(name) => {
            check_name(name)?;
            b.attr_be32(NFTA_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER)?;
            b.attr_strz(NFTA_OBJREF_IMM_NAME, name)?;
        }
    }
    b.nest_end(data)?;
    b.nest_end(elem)
}

// ---- reading counters ----

/// Encodes a dump request for every counter object in `inet <table>`.
pub fn encode_get_counters(table: &str, seq: u32) -> Result<Vec<u8>, NftError> {
    check_name(table)?;
    let mut b = NlBuf::with_capacity(64);
    let m = b.begin(nft_type(NFT_MSG_GETOBJ), NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.put(&nfgenmsg(NFPROTO_INET, 0));
    // The kernel filters the dump by table and object type.
    b.attr_strz(NFTA_OBJ_TABLE, table)?;
    b.attr_be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER)?;
    b.end(m)?;
    Ok(b.into_bytes())
}

/// One counter object from a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterValue {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What one datagram of a counter dump held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpChunk {
    /// Counters so far; the dump goes on.
    More(Vec<CounterValue>),
    /// The last counters; the dump is complete.
    Done(Vec<CounterValue>),
    /// The kernel refused the dump with this errno.
    Failed(i32),
}

/// Parses one datagram of the reply to [`encode_get_counters`]. Messages with another sequence
/// number (left over from an earlier request on the same socket) are skipped.
pub fn parse_counter_dump(buf: &[u8], seq: u32) -> Result<DumpChunk, NftError> {
    let mut out = Vec::new();
    for msg in messages(buf) {
        let msg = msg?;
        if msg.seq != seq {
            continue;
        }
        match msg.ty {
            NLMSG_DONE => return Ok(DumpChunk::Done(out)),
            NLMSG_ERROR => {
                let errno = ack_errno(msg.payload)?;
                if errno != 0 {
                    return Ok(DumpChunk::Failed(errno));
                }
            }
            t if t == nft_type(NFT_MSG_NEWOBJ) => {
                if let Some(c) = parse_counter_obj(msg.payload.get(4..).unwrap_or(&[]))? {
                    out.push(c);
                }
            }
            _ => {}
        }
    }
    Ok(DumpChunk::More(out))
}

fn parse_counter_obj(attrs_buf: &[u8]) -> Result<Option<CounterValue>, NftError> {
    let mut name = None;
    let mut is_counter = false;
    let mut packets = None;
    let mut bytes = None;
    for a in attrs(attrs_buf) {
        let (ty, payload) = a?;
        match ty {
            NFTA_OBJ_NAME => {
                let s = payload.split(|&c| c == 0).next().unwrap_or(&[]);
                name = Some(String::from_utf8_lossy(s).into_owned());
            }
            NFTA_OBJ_TYPE => is_counter = be32(payload)? == NFT_OBJECT_COUNTER,
            NFTA_OBJ_DATA => {
                for inner in attrs(payload) {
                    let (ty, v) = inner?;
                    match ty {
                        NFTA_COUNTER_PACKETS => packets = Some(be64(v)?),
                        NFTA_COUNTER_BYTES => bytes = Some(be64(v)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !is_counter {
        return Ok(None);
    }
    match (name, packets, bytes) {
        (Some(name), Some(packets), Some(bytes)) => Ok(Some(CounterValue {
            name,
            packets,
            bytes,
        })),
        _ => Err(NftError::Malformed {
            what: "counter object without name, packets or bytes",
        }),
    }
}

fn be32(v: &[u8]) -> Result<u32, NftError> {
    let a: [u8; 4] = v.try_into().map_err(|_| NftError::Malformed {
        what: "32-bit attribute size",
    })?;
    Ok(u32::from_be_bytes(a))
}

fn be64(v: &[u8]) -> Result<u64, NftError> {
    let a: [u8; 8] = v.try_into().map_err(|_| NftError::Malformed {
        what: "64-bit attribute size",
    })?;
    Ok(u64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_table() -> Table {
        Table {
            name: "t".into(),
            counters: vec!["c".into()],
            chains: vec![Chain {
                name: "out".into(),
                chain_type: ChainType::Filter,
                priority: -100,
                policy: Verdict::Drop,
                rules: vec![vec![
                    Expr::Meta(MetaKey::L4Proto),
                    Expr::Cmp {
                        op: CmpOp::Eq,
                        data: vec![17],
                    },
                    Expr::CounterRef("c".into()),
                    Expr::Verdict(Verdict::Drop),
                ]],
            }],
        }
    }

    #[test]
    fn a_batch_is_framed_by_begin_and_end_and_only_its_last_message_asks_for_an_ack() {
        let batch = encode_table_batch(&tiny_table(), 100).unwrap();
        let msgs: Vec<_> = messages(batch.bytes()).map(|m| m.unwrap()).collect();
        let types: Vec<u16> = msgs.iter().map(|m| m.ty).collect();
        assert_eq!(
            types,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                nft_type(NFT_MSG_NEWTABLE),
                nft_type(NFT_MSG_NEWOBJ),
                nft_type(NFT_MSG_NEWCHAIN),
                nft_type(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        let seqs: Vec<u32> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![100, 101, 102, 103, 104, 105]);
        assert_eq!(batch.seqs(), 101..=104);
        // Flags live at bytes 6..8 of each header; re-split to read them.
        let mut off = 0;
        let bytes = batch.bytes();
        for (i, m) in msgs.iter().enumerate() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let flags = u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap());
            // Only the last message inside the batch asks for an ack.
            let last_inner = i == msgs.len() - 2;
            assert_eq!(
                flags & NLM_F_ACK != 0,
                last_inner,
                "message {i} type {}",
                m.ty
            );
            assert_ne!(flags & NLM_F_REQUEST, 0);
            off += align4(len);
        }
        assert_eq!(off, bytes.len());
        // The begin/end messages address the nftables subsystem.
        assert_eq!(msgs[0].payload, &[0, 0, 0, 10]);
    }

    #[test]
    fn a_rule_encodes_its_expressions_in_order_with_names_and_register_one() {
        let batch = encode_table_batch(&tiny_table(), 1).unwrap();
        let rule = messages(batch.bytes())
            .map(|m| m.unwrap())
            .find(|m| m.ty == nft_type(NFT_MSG_NEWRULE))
            .unwrap();
        let mut names = Vec::new();
        for a in attrs(&rule.payload[4..]) {
            let (ty, payload) = a.unwrap();
            if ty != NFTA_RULE_EXPRESSIONS {
                continue;
            }
            for elem in attrs(payload) {
                let (ty, elem) = elem.unwrap();
                assert_eq!(ty, NFTA_LIST_ELEM);
                let mut parts = attrs(elem).map(|a| a.unwrap());
                let (ty, name) = parts.next().unwrap();
                assert_eq!(ty, NFTA_EXPR_NAME);
                names.push(String::from_utf8(name.to_vec()).unwrap());
                let (ty, _data) = parts.next().unwrap();
                assert_eq!(ty, NFTA_EXPR_DATA);
            }
        }
        assert_eq!(names, ["meta\0", "cmp\0", "objref\0", "immediate\0"]);
    }

    #[test]
    fn the_cmp_expression_matches_the_bytes_nft_itself_sends() {
        // `cmp eq reg 1 0x00000011` as libnftnl encodes it (checked against `nft --debug=mnl`
        // layout: sreg, op, nested data value; every integer big-endian).
        let mut b = NlBuf::default();
        encode_expr(
            &mut b,
            &Expr::Cmp {
                op: CmpOp::Eq,
                data: vec![17],
            },
        )
        .unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            44, 0, 1, 0x80,                 // list elem (nested), 44 bytes
            8, 0, 1, 0, b'c', b'm', b'p', 0, // name "cmp\0"
            32, 0, 2, 0x80,                 // expr data (nested)
            8, 0, 1, 0, 0, 0, 0, 1,         // sreg = 1
            8, 0, 2, 0, 0, 0, 0, 0,         // op = eq
            12, 0, 3, 0x80,                 // cmp data (nested)
            5, 0, 1, 0, 17, 0, 0, 0,        // value 0x11, padded
        ];
        // A nest's length counts its attributes with their padding (cmp data: 4 + 8 = 12).
        assert_eq!(b.as_bytes(), &want[..]);
    }

    #[test]
    fn names_that_the_kernel_would_reject_are_refused_before_sending() {
        let mut t = tiny_table();
        t.name = String::new();
        assert!(matches!(
            encode_table_batch(&t, 1),
            Err(NftError::BadName { .. })
        ));
        let mut t = tiny_table();
        t.chains[0].name = "a\0b".into();
        assert!(matches!(
            encode_table_batch(&t, 1),
            Err(NftError::BadName { .. })
        ));
        let mut t = tiny_table();
        t.counters[0] = "x".repeat(256);
        assert!(matches!(
            encode_table_batch(&t, 1),
            Err(NftError::BadName { .. })
        ));
    }

    #[test]
    fn describe_names_the_rule_behind_a_sequence_number() {
        let t = tiny_table();
        let batch = encode_table_batch(&t, 10).unwrap();
        assert_eq!(batch.describe(&t, 11), "nftables: add table inet t");
        assert_eq!(batch.describe(&t, 12), "nftables: add counter c");
        assert_eq!(batch.describe(&t, 13), "nftables: add chain out");
        assert_eq!(batch.describe(&t, 14), "nftables: add rule 1 of chain out");
    }

    fn obj_reply(seq: u32, name: &str, packets: u64, bytes: u64) -> Vec<u8> {
        let mut b = NlBuf::default();
        let m = b.begin(nft_type(NFT_MSG_NEWOBJ), 0x2, seq);
        b.put(&nfgenmsg(NFPROTO_INET, 0));
        b.attr_strz(NFTA_OBJ_TABLE, "cordon").unwrap();
        b.attr_strz(NFTA_OBJ_NAME, name).unwrap();
        b.attr_be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER).unwrap();
        let d = b.nest_begin(NFTA_OBJ_DATA);
        b.attr(NFTA_COUNTER_BYTES, &bytes.to_be_bytes()).unwrap();
        b.attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes())
            .unwrap();
        b.nest_end(d).unwrap();
        b.end(m).unwrap();
        b.into_bytes()
    }

    #[test]
    fn a_counter_dump_is_parsed_and_stale_replies_are_skipped() {
        let mut buf = obj_reply(7, "stale", 9, 9);
        buf.extend(obj_reply(8, "drop_udp", 3, 87));
        let chunk = parse_counter_dump(&buf, 8).unwrap();
        assert_eq!(
            chunk,
            DumpChunk::More(vec![CounterValue {
                name: "drop_udp".into(),
                packets: 3,
                bytes: 87
            }])
        );
        let mut done = NlBuf::default();
        let m = done.begin(NLMSG_DONE, 0x2, 8);
        done.put(&0i32.to_ne_bytes());
        done.end(m).unwrap();
        assert_eq!(
            parse_counter_dump(done.as_bytes(), 8).unwrap(),
            DumpChunk::Done(vec![])
        );
    }

    #[test]
    fn a_refused_dump_reports_the_errno() {
        let mut b = NlBuf::default();
        let m = b.begin(NLMSG_ERROR, 0, 5);
        b.put(&(-libc::EPERM).to_ne_bytes());
        b.put(&[0u8; 16]);
        b.end(m).unwrap();
        assert_eq!(
            parse_counter_dump(b.as_bytes(), 5).unwrap(),
            DumpChunk::Failed(libc::EPERM)
        );
    }

    #[test]
    fn truncated_replies_are_errors_not_panics() {
        let full = obj_reply(1, "drop_udp", 1, 1);
        for cut in 1..full.len() {
            // Any prefix either parses (if it ends on a boundary) or is an error; never a panic.
            let _ = parse_counter_dump(&full[..cut], 1);
        }
        assert!(parse_counter_dump(&full[..10], 1).is_err());
        let mut bad_len = full.clone();
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_counter_dump(&bad_len, 1).is_err());
    }
}
