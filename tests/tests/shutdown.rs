//! SIGTERM drains the server: new requests are refused, requests in flight get the grace period
//! and are then ended with finish reason CANCELLED (and their usage), and the process exits.

use std::time::Duration;

use futures::StreamExt;
use helios_proto::v1::FinishReason;
use helios_tests::default_model;
use helios_tests::server::{long_request, send_signal, stream_started, Process};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_what_outlives_the_grace_period_and_exits() {
    let model = default_model();
    let mut server = Process::serve(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--shutdown-grace",
        "1",
    ]);
    let mut client = server.client().await;
    let long = long_request(3000);
    let (mut stream, mut tokens) = stream_started(&mut client, long.clone(), 2).await;
    send_signal(server.pid(), "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = client
        .generate(long)
        .await
        .expect_err("a request while draining");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    let mut last = None;
    while let Some(resp) = stream.next().await {
        let resp = resp.expect("the stream ends with a response, not an error");
        tokens += resp.token_ids.len();
        if resp.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(resp);
        }
    }
    let last = last.expect("a last response");
    assert_eq!(last.finish_reason, FinishReason::Cancelled as i32);
    assert_eq!(
        last.usage.map(|u| u.completion_tokens as usize),
        Some(tokens)
    );
    assert!(tokens < 3000);
    let exit = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server did not exit after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}
