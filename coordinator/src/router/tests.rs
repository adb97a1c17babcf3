use super::*;

const BLOCK: usize = 4;

/// A prefix index holding the first `blocks` blocks of `tokens`.
fn holding(tokens: &[u32], blocks: usize) -> PrefixIndex {
    let index = PrefixIndex::default();
    for h in prompt_hashes(tokens, BLOCK).into_iter().take(blocks) {
        index.insert(h);
    }
    index
}

fn view(id: u32, load: usize, prefixes: &PrefixIndex) -> ReplicaView<'_> {
    ReplicaView {
        id,
        accepts: Accepts::Serving,
        load,
        kv_blocks_free: 100,
        prefixes,
    }
}

fn router(policy: Policy) -> Router {
    Router::new(
        RouterOptions {
            policy,
            balance: 4,
            failover_after: Some(Duration::from_secs(5)),
        },
        BLOCK,
    )
}

fn ask(prompt: &[u32]) -> RouteRequest<'_> {
    RouteRequest {
        prompt,
        session: None,
        moving: false,
    }
}

#[test]
fn cache_aware_prefers_the_longest_cached_prefix_within_the_balance() {
    let prompt: Vec<u32> = (0..32).collect();
    let (two, five, none) = (
        holding(&prompt, 2),
        holding(&prompt, 5),
        PrefixIndex::default(),
    );
    let r = router(Policy::CacheAware);
    let views = [view(0, 1, &two), view(1, 3, &five), view(2, 0, &none)];
    assert_eq!(r.choose(&views, ask(&prompt)), Some((1, Reason::Cache)));
    // Five more requests than the least loaded (balance 4): the least loaded wins.
    let views = [view(0, 1, &two), view(1, 5, &five), view(2, 0, &none)];
    assert_eq!(r.choose(&views, ask(&prompt)), Some((2, Reason::Load)));
    // No replica holds any of the prompt: the least loaded.
    let other: Vec<u32> = (100..132).collect();
    let views = [view(0, 2, &two), view(1, 1, &five)];
    assert_eq!(r.choose(&views, ask(&other)), Some((1, Reason::Load)));
    // The cache's choice cannot hold the rest of the prompt in its free KV: the least loaded.
    let mut full = view(1, 1, &five);
    full.kv_blocks_free = 2;
    let views = [view(0, 1, &two), full];
    assert_eq!(r.choose(&views, ask(&prompt)), Some((0, Reason::Load)));
}

#[test]
fn new_prefixes_spread_over_equally_loaded_replicas() {
    let prompt: Vec<u32> = (0..32).collect();
    let (some, none) = (holding(&prompt, 3), PrefixIndex::default());
    let r = router(Policy::CacheAware);
    let other: Vec<u32> = (100..132).collect();
    let views = [view(0, 0, &some), view(1, 0, &none)];
    assert_eq!(r.choose(&views, ask(&other)), Some((1, Reason::Load)));
}

#[test]
fn least_load_and_round_robin() {
    let none = PrefixIndex::default();
    let views = [view(0, 3, &none), view(1, 1, &none), view(2, 1, &none)];
    let r = router(Policy::LeastLoad);
    assert_eq!(r.choose(&views, ask(&[1])), Some((1, Reason::Load)));
    let r = router(Policy::RoundRobin);
    let picks: Vec<usize> = (0..6)
        .filter_map(|_| r.choose(&views, ask(&[1])).map(|c| c.0))
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn a_session_sticks_to_its_replica_while_it_serves() {
    let none = PrefixIndex::default();
    let r = router(Policy::LeastLoad);
    let chat = RouteRequest {
        prompt: &[1, 2, 3],
        session: Some("alice"),
        moving: false,
    };
    let views = [view(0, 5, &none), view(1, 0, &none)];
    assert_eq!(r.choose(&views, chat), Some((1, Reason::Load)));
    // Replica 1 is busier now, but alice stays.
    let views = [view(0, 0, &none), view(1, 9, &none)];
    assert_eq!(r.choose(&views, chat), Some((1, Reason::Session)));
    // Replica 1 is lost: alice moves, and stays where she moved.
    let mut lost = view(1, 0, &none);
    lost.accepts = Accepts::No;
    assert_eq!(
        r.choose(&[view(0, 3, &none), lost], chat),
        Some((0, Reason::Load))
    );
    let views = [view(0, 9, &none), view(1, 0, &none)];
    assert_eq!(r.choose(&views, chat), Some((0, Reason::Session)));
}

#[test]
fn only_serving_replicas_unless_none_serves() {
    let none = PrefixIndex::default();
    let r = router(Policy::LeastLoad);
    let mut recovering = view(0, 0, &none);
    recovering.accepts = Accepts::Queueing;
    let mut down = view(1, 0, &none);
    down.accepts = Accepts::No;
    let serving = view(2, 7, &none);
    assert_eq!(
        r.choose(&[recovering, down, serving], ask(&[1])),
        Some((2, Reason::Load))
    );
    assert_eq!(
        r.choose(&[recovering, down], ask(&[1])),
        Some((0, Reason::Load))
    );
    let mut late = view(3, 0, &none);
    late.accepts = Accepts::Late;
    assert_eq!(
        r.choose(&[late, recovering], ask(&[1])),
        Some((1, Reason::Load))
    );
    assert_eq!(r.choose(&[down, late], ask(&[1])), Some((1, Reason::Load)));
    assert_eq!(r.choose(&[down], ask(&[1])), None);
    // A request moving off a lost replica goes to one that serves (the one it left too, once
    // that serves again) or that recovers briefly...
    let moving = RouteRequest {
        prompt: &[1],
        session: None,
        moving: true,
    };
    assert_eq!(r.choose(&[serving, down], moving), Some((0, Reason::Load)));
    // ...never to one recovering too long, which would hand it back.
    assert_eq!(r.choose(&[late, down], moving), None);
    assert_eq!(
        r.choose(&[late, recovering], moving),
        Some((1, Reason::Load))
    );
}

#[test]
fn a_replica_recovering_too_long_takes_nothing() {
    let long_ago = std::time::Instant::now() - Duration::from_secs(10);
    let now = ReplicaSnapshot {
        state: ReplicaState::Recovering("rank 1 lost".into()),
        state_since: Some(long_ago),
        ..Default::default()
    };
    assert_eq!(
        Accepts::of(&now, Some(Duration::from_secs(5))),
        Accepts::Late
    );
    assert_eq!(
        Accepts::of(&now, Some(Duration::from_secs(60))),
        Accepts::Queueing
    );
    assert_eq!(
        Accepts::of(&now, None),
        Accepts::Queueing,
        "one replica: it queues"
    );
    let serving = ReplicaSnapshot {
        state: ReplicaState::Serving,
        ..Default::default()
    };
    assert_eq!(Accepts::of(&serving, None), Accepts::Serving);
}
