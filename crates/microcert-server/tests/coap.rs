//! The device resources over CoAP on real UDP sockets on 127.0.0.1.

mod common;

use coap_lite::ResponseType;
use microcert_server::coap_client::CoapClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_over_coap() {
    let srv = common::TestServer::start().await;
    let mut client = CoapClient::connect(srv.coap).await.unwrap();
    let r = client
        .post("/v1/device/challenge", &[1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .unwrap();
    assert_eq!(r.code, ResponseType::Changed, "{r:?}");
    assert_eq!(r.payload.len(), 16);
    srv.stop().await;
}
