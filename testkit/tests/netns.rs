//! The namespace harness itself: two hosts, a link, a partition, a heal.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use meshbridge_testkit::netns::{Link, Netns, available};
use meshbridge_testkit::process::Proc;

async fn can_connect(ns: &Netns, addr: &str, port: u16) -> bool {
    let mut c = ns.tokio_command("bash");
    c.args([
        "-c",
        &format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{addr}/{port}'"),
    ]);
    c.status().await.map(|s| s.success()).unwrap_or(false)
}

#[tokio::test]
async fn partition_cuts_and_heal_restores_connectivity() {
    if !available() {
        return;
    }
    let a = Netns::new("a").unwrap();
    let b = Netns::new("b").unwrap();
    let link = Link::new(&a, "10.77.1.1", &b, "10.77.1.2").unwrap();
    let mut server = b.tokio_command("python3");
    server.args([
        "-c",
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('10.77.1.2',7070))\ns.listen(16)\nprint('listening',flush=True)\n\
         while True:\n  c,_=s.accept()\n  c.close()",
    ]);
    let mut server = Proc::spawn("listener", server).unwrap();
    server
        .wait_for("listening", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        can_connect(&a, "10.77.1.2", 7070).await,
        "linked hosts connect"
    );
    link.set_up(false).unwrap();
    assert!(
        !can_connect(&a, "10.77.1.2", 7070).await,
        "a partition cuts the link"
    );
    link.set_up(true).unwrap();
    // Bounded: the link comes back within a few tries once it is up.
    let mut ok = false;
    for _ in 0..20 {
        if can_connect(&a, "10.77.1.2", 7070).await {
            ok = true;
            break;
        }
    }
    assert!(ok, "healing restores connectivity");
    server.kill9().await;
}
