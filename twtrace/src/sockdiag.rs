//! The kernel's socket-diagnostics interface (`NETLINK_SOCK_DIAG`, what
//! `ss` uses): every TCP socket of the calling thread's network namespace
//! in the asked states, TIME_WAIT and orphaned FIN_WAIT2 mini-sockets
//! included. Run it inside a namespace with `netns::read_in`.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
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
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context(
        "opening a NETLINK_SOCK_DIAG socket (the kernel's socket diagnostics, as ss uses)",
    )?;
    socket
        .bind_auto()
        .context("binding the socket-diagnostics socket")?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .context("connecting the socket-diagnostics socket")?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        request(&socket, family, states)?;
        receive(&socket, &mut found)?;
    }
    Ok(found)
}

fn request(socket: &Socket, family: u8, states: &StateFlags) -> anyhow::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: states.clone(),
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

/// Reads one dump's answers until the kernel says it is done.
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
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    bail!("the kernel refused the socket-diagnostics dump: {e:?}")
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    if let Some(socket) = describe(&response, bytes) {
                        found.push(socket);
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
}
