//! A TCP proxy a test can cut and restore, to make a service unreachable
//! without stopping it.
//!
//! Killing a stand-in loses its state (the Nomad stand-in's jobs, the
//! gpu-task children it runs) and a killed Consul dev agent forgets its
//! registrations; a network outage loses neither. [`Proxy::cut`] closes every
//! open connection and, until [`Proxy::restore`], closes each new one as soon
//! as it is accepted: clients see their requests and streams drop, as they
//! would across a broken link. Dropping the proxy closes everything. It runs
//! on the test's runtime: a test that blocks its thread stalls the link too.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running proxy to one upstream address.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect (127.0.0.1, a free port).
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let accept = tokio::spawn(serve(listener, upstream, cut.clone()));
        Ok(Proxy { addr, cut, accept })
    }

    /// `http://ADDR`, for a service's `*_ADDR` setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every open connection and every new one until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connections' tasks: aborting it ends them.
        self.accept.abort();
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, cut: watch::Sender<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                if *cut.borrow() {
                    continue; // dropped: closed at once
                }
                connections.spawn(forward(inbound, upstream, cut.subscribe()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn forward(mut inbound: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(stream: &mut TcpStream) -> std::io::Result<[u8; 4]> {
        stream.write_all(b"ping").await?;
        let mut buf = [0; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_cuts_open_and_new_connections_and_restores() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(&roundtrip(&mut open).await.unwrap(), b"ping");

        proxy.cut();
        let mut buf = [0; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), open.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the open connection is closed: {read:?}");
        let mut new = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(roundtrip(&mut new).await.is_err(), "a new connection is closed at once");

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(&roundtrip(&mut again).await.unwrap(), b"ping");
    }
}
