//! The kernel's socket-diagnostics interface (`NETLINK_SOCK_DIAG`, what
//! `ss` uses): every TCP socket of the calling thread's network namespace
//! in the asked states, TIME_WAIT and orphaned FIN_WAIT2 mini-sockets
//! included. Run it inside a namespace with `netns::read_in`.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::event::TcpState;

/// One socket as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub state: TcpState,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The socket's inode (what `/proc/PID/fd` links to); 0 for a
    /// mini-socket, which belongs to no process.
    pub inode: u32,
    /// A TIME_WAIT mini-socket (in its TIME_WAIT or FIN_WAIT2 substate):
    /// the time left on its timer, in milliseconds.
    pub mini_socket_remaining_ms: Option<u32>,
    /// Full sockets: milliseconds since data was last received and sent
    /// (`tcp_info`), the kernel's evidence of when a state began.
    pub last_data_recv_ms: Option<u32>,
    pub last_data_sent_ms: Option<u32>,
}

/// The TCP states teardown passes through, plus LISTEN (the owner of a
/// listener is the owner of its port's server-side mini-sockets).
#[must_use]
pub fn teardown_and_listen() -> StateFlags {
    StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSING
        | StateFlags::TIME_WAIT
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::LISTEN
}

/// Every TCP socket (IPv4 and IPv6) of this thread's namespace in `states`.
pub fn dump(states: &StateFlags) -> anyhow::Result<Vec<DiagSocket>> {
    let socket = open()?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        request(&socket, NLM_F_REQUEST | NLM_F_DUMP, states.clone(), id)?;
        receive(&socket, &mut found)?;
    }
    Ok(found)
}

/// Looks sockets up by their addresses, one request each: cheaper than a
/// dump when a few are wanted among many. Made once per namespace.
pub struct Lookup {
    socket: Socket,
}

impl Lookup {
    /// A lookup in this thread's network namespace.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { socket: open()? })
    }

    /// The socket (full or mini) with local address `src` and remote
    /// `dst`, if the kernel has one.
    pub fn find(&self, src: SocketAddr, dst: SocketAddr) -> anyhow::Result<Option<DiagSocket>> {
        let id = SocketId {
            source_port: src.port(),
            destination_port: dst.port(),
            source_address: src.ip(),
            destination_address: dst.ip(),
            interface_id: 0,
            // INET_DIAG_NOCOOKIE: any socket with these addresses.
            cookie: [0xff; 8],
        };
        let family = if src.is_ipv4() { AF_INET } else { AF_INET6 };
        request_family(&self.socket, family, NLM_F_REQUEST, StateFlags::all(), id)?;
        let mut found = Vec::new();
        match receive(&self.socket, &mut found) {
            Ok(()) => Ok(found.pop()),
            // The kernel answers ENOENT when no socket has them.
            Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The kernel found no socket for an exact lookup.
#[derive(Debug)]
struct NotFound;

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no such socket")
    }
}

impl std::error::Error for NotFound {}

fn open() -> anyhow::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context(
        "opening a NETLINK_SOCK_DIAG socket (the kernel's socket diagnostics, as ss uses)",
    )?;
    socket
        .bind_auto()
        .context("binding the socket-diagnostics socket")?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .context("connecting the socket-diagnostics socket")?;
    Ok(socket)
}

fn request(socket: &Socket, flags: u16, states: StateFlags, id: SocketId) -> anyhow::Result<()> {
    let family = if id.source_address.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    request_family(socket, family, flags, states, id)
}

fn request_family(
    socket: &Socket,
    family: u8,
    flags: u16,
    states: StateFlags,
    socket_id: SocketId,
) -> anyhow::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("asking the kernel for its TCP sockets (NETLINK_SOCK_DIAG)")?;
    Ok(())
}

/// Reads answers until the kernel says it is done (a dump), or until the
/// one answer of an exact lookup.
fn receive(socket: &Socket, found: &mut Vec<DiagSocket>) -> anyhow::Result<()> {
    // A dump answer comes in datagrams of at most a few pages each.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut buf[..], 0)
            .context("reading the kernel's socket-diagnostics answer")?;
        let mut offset = 0;
        while offset < size {
            let bytes = &buf[offset..size];
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .context("decoding a socket-diagnostics answer")?;
            let length = message.header.length as usize;
            let multipart = message.header.flags & NLM_F_MULTIPART != 0;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    if e.code.map(|c| -c.get()) == Some(libc::ENOENT) {
                        return Err(NotFound.into());
                    }
                    bail!("the kernel refused the socket-diagnostics request: {e:?}")
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    if let Some(socket) = describe(&response, bytes) {
                        found.push(socket);
                    }
                    if !multipart {
                        return Ok(());
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            // Netlink messages are 4-byte aligned.
            offset += (length + 3) & !3;
        }
    }
}

/// `struct inet_diag_msg` (a stable uAPI) after the 16-byte netlink header:
/// `idiag_expires` follows family, state, timer, retrans (4 bytes) and the
/// 48-byte socket id. The netlink crate drops it for TIME_WAIT timers,
/// yet it is the mini-socket's age.
const EXPIRES_OFFSET: usize = 16 + 4 + 48;
/// `idiag_timer` of a mini-socket: its TIME_WAIT timer.
const TIMER_TIME_WAIT: u8 = 3;
const TIMER_OFFSET: usize = 16 + 2;
/// `struct tcp_info` (uAPI): `tcpi_last_data_sent` and `tcpi_last_data_recv`.
const LAST_DATA_SENT_OFFSET: usize = 44;
const LAST_DATA_RECV_OFFSET: usize = 52;

fn describe(
    response: &netlink_packet_sock_diag::inet::InetResponse,
    message: &[u8],
) -> Option<DiagSocket> {
    let header = &response.header;
    let id = &header.socket_id;
    let state = TcpState::from_kernel(header.state)?;
    let mini = header.inode == 0 && message.get(TIMER_OFFSET) == Some(&TIMER_TIME_WAIT);
    let tcp_info = response.nlas.iter().find_map(|nla| match nla {
        Nla::TcpInfo(bytes) => Some(bytes.as_slice()),
        _ => None,
    });
    Some(DiagSocket {
        state,
        src: SocketAddr::new(id.source_address, id.source_port),
        dst: SocketAddr::new(id.destination_address, id.destination_port),
        inode: header.inode,
        mini_socket_remaining_ms: if mini {
            read_u32(message, EXPIRES_OFFSET)
        } else {
            None
        },
        last_data_recv_ms: tcp_info.and_then(|t| read_u32(t, LAST_DATA_RECV_OFFSET)),
        last_data_sent_ms: tcp_info.and_then(|t| read_u32(t, LAST_DATA_SENT_OFFSET)),
    })
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let field = bytes.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn a_close_wait_socket_of_ours_is_listed_with_its_inode_and_tcp_info() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(server_addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        // The client closes first; the server never does: CLOSE_WAIT.
        let client_addr = client.local_addr().unwrap();
        drop(client);
        let mut buf = [0; 1];
        let mut reader = &server;
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        let sockets = dump(&teardown_and_listen()).unwrap();
        let ours = sockets
            .iter()
            .find(|s| s.src == server_addr && s.dst == client_addr)
            .expect("the server's socket is listed");
        assert_eq!(ours.state, TcpState::CloseWait);
        assert_ne!(ours.inode, 0);
        assert!(ours.last_data_recv_ms.is_some());
        assert_eq!(ours.mini_socket_remaining_ms, None);
        let client_side = sockets
            .iter()
            .find(|s| s.src == client_addr)
            .expect("the client's orphaned socket is listed");
        assert!(matches!(
            client_side.state,
            TcpState::FinWait2 | TcpState::FinWait1
        ));
        assert!(
            sockets
                .iter()
                .any(|s| s.src == server_addr && s.state == TcpState::Listen)
        );
        drop(server);
    }

    #[test]
    fn a_lookup_finds_an_orphaned_mini_socket_and_sees_it_move_to_time_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(server_addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client_addr = client.local_addr().unwrap();
        drop(client);
        let mut buf = [0; 1];
        assert_eq!((&server).read(&mut buf).unwrap(), 0);
        let lookup = Lookup::new().unwrap();
        let find = || {
            lookup
                .find(client_addr, server_addr)
                .unwrap()
                .expect("found")
        };
        let wait_for = |state| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let now = find();
                if now.state == state || std::time::Instant::now() > deadline {
                    break now;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        // The client's FIN acknowledged (the ACK may be delayed): an
        // orphaned FIN_WAIT2 mini-socket.
        let orphan = wait_for(TcpState::FinWait2);
        assert_eq!(orphan.state, TcpState::FinWait2);
        assert_eq!(orphan.inode, 0);
        assert!(orphan.mini_socket_remaining_ms.is_some());
        drop(server);
        // The server's FIN moves it to TIME_WAIT, with a fresh 60 s timer.
        let moved = wait_for(TcpState::TimeWait);
        assert_eq!(moved.state, TcpState::TimeWait);
        let remaining = moved.mini_socket_remaining_ms.unwrap();
        assert!((58_000..=60_000).contains(&remaining), "{remaining}");
        // An address pair nobody uses.
        let nobody: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(lookup.find(nobody, server_addr).unwrap(), None);
    }
}
