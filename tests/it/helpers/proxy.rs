//! A TCP proxy the test owns, in front of the broker or the database.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Live connections are dropped and new ones refused: a dead server, a partition with RSTs.
    Refuse,
    /// Connections stay open and new ones are accepted, but nothing is forwarded either way: a
    /// black hole (a firewall dropping packets, a hung server). Connections held in it are
    /// dropped when the mode changes again, as the peer's TCP would have given up by then.
    BlackHole,
}

/// `cut()` refuses, `black_hole()` swallows, `restore()` forwards again. Dropping it stops it.
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

/// Hold a connection without reading from it until the mode changes.
async fn hold(streams: impl Sized, mut mode: watch::Receiver<Mode>) {
    let _ = mode.changed().await;
    drop(streams);
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let target = target.to_owned();
        let modes = mode.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                let mut changes = modes.subscribe();
                let now = *changes.borrow_and_update();
                match now {
                    Mode::Refuse => continue,
                    Mode::BlackHole => {
                        tokio::spawn(hold(inbound, changes));
                        continue;
                    }
                    Mode::Forward => {}
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = changes.changed() => {
                            if *changes.borrow_and_update() == Mode::BlackHole {
                                hold((inbound, outbound), changes).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, mode, accept }
    }

    pub fn cut(&self) {
        self.mode.send_replace(Mode::Refuse);
    }

    pub fn black_hole(&self) {
        self.mode.send_replace(Mode::BlackHole);
    }

    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    /// The broker through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
