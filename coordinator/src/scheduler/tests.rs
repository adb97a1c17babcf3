use super::*;

fn params(max_new_tokens: usize) -> SequenceParams {
    SequenceParams {
        max_new_tokens,
        stop_token_ids: vec![0],
        ..Default::default()
    }
}

fn config(max_batch_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        max_running: 16,
        max_waiting: 64,
        prefix_caching: true,
    }
}

fn sched(blocks: usize, block_size: usize, max_batch_tokens: usize) -> Scheduler {
    Scheduler::new(
        BlockManager::new(blocks, block_size),
        config(max_batch_tokens),
    )
}

/// A fake rank 0: samples `seq_id + 1` for every sequence that asks.
fn answer(plan: &StepPlan) -> StepResult {
    answer_with(plan, |s| s.seq_id as u32 + 1)
}

fn step(s: &mut Scheduler) -> (StepPlan, Vec<Sampled>) {
    let plan = s.schedule().unwrap().unwrap();
    let out = s.apply(answer(&plan)).unwrap();
    s.audit().unwrap();
    (plan, out)
}

#[test]
fn decodes_go_first_then_prompt_chunks_within_the_budget() {
    let mut s = sched(64, 4, 8);
    s.add(Sequence::new(1, vec![5; 3], params(4))).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs.len(), 1);
    assert!(plan.seqs[0].sample);
    s.add(Sequence::new(2, vec![6; 20], params(4))).unwrap();
    let (plan, _) = step(&mut s);
    let lens: Vec<(u64, usize, bool)> = plan
        .seqs
        .iter()
        .map(|q| (q.seq_id, q.token_ids.len(), q.sample))
        .collect();
    assert_eq!(lens, vec![(1, 1, true), (2, 7, false)]);
    assert_eq!(plan.seqs[1].start_pos, 0);
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs[1].start_pos, 7);
}

#[test]
fn finished_sequences_give_back_their_blocks() {
    let mut s = sched(16, 4, 64);
    s.add(Sequence::new(7, vec![1; 5], params(3))).unwrap();
    let mut generated = Vec::new();
    while let Some(plan) = s.schedule().unwrap() {
        for t in s.apply(answer(&plan)).unwrap() {
            generated.push((t.token.token_id, t.finish));
        }
    }
    assert_eq!(
        generated,
        vec![(8, None), (8, None), (8, Some(FinishReason::Length))]
    );
    assert!(s.is_idle());
    assert_eq!(s.stats().kv_blocks_free as usize, 16);
    // With its first token as a stop token, a sequence ends at the first sample.
    let mut p = params(10);
    p.stop_token_ids = vec![9];
    s.add(Sequence::new(8, vec![2; 5], p)).unwrap();
    let (_, out) = step(&mut s);
    assert_eq!(out[0].finish, Some(FinishReason::Eos));
    assert_eq!(s.stats().kv_blocks_free as usize, 16);
}

#[test]
fn refusals_name_the_reason() {
    let mut s = Scheduler::new(
        BlockManager::new(4, 4),
        SchedulerConfig {
            max_waiting: 2,
            ..config(64)
        },
    );
    assert!(matches!(
        s.add(Sequence::new(1, vec![1; 16], params(1))),
        Err(AddError::NeverFits { need: 5, .. })
    ));
    assert!(matches!(
        s.add(Sequence::new(2, vec![], params(1))),
        Err(AddError::EmptyPrompt)
    ));
    s.add(Sequence::new(3, vec![1; 4], params(1))).unwrap();
    s.add(Sequence::new(4, vec![1; 4], params(1))).unwrap();
    assert!(matches!(
        s.add(Sequence::new(5, vec![1; 4], params(1))),
        Err(AddError::QueueFull(2))
    ));
}

#[test]
fn a_malformed_answer_fails_exactly_the_planned_sequences() {
    let mut s = sched(16, 4, 64);
    s.add(Sequence::new(3, vec![1; 2], params(4))).unwrap();
    s.add(Sequence::new(4, vec![1; 2], params(4))).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    let mut short = answer(&plan);
    short.tokens.pop();
    let failed = s.apply(short).unwrap_err();
    assert_eq!(failed.seq_ids, vec![3, 4]);
    assert!(s.is_idle());
    assert_eq!(s.stats().kv_blocks_free as usize, 16);
    s.audit().unwrap();
    s.add(Sequence::new(5, vec![1; 2], params(4))).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.finished_seq_ids, vec![3, 4], "the ranks forget them");
    let mut long = answer(&plan);
    long.tokens.push(long.tokens[0].clone());
    assert!(s.apply(long).is_err());
}

#[test]
fn block_tables_go_out_once_then_only_what_they_gain() {
    let mut s = sched(16, 4, 64);
    s.add(Sequence::new(1, vec![1; 6], params(8))).unwrap();
    let sent = |s: &mut Scheduler| {
        let (plan, _) = step(s);
        let q = &plan.seqs[0];
        (
            q.block_table.clone(),
            q.append_blocks,
            plan.finished_seq_ids.clone(),
        )
    };
    // Prompt of 6: two blocks, whole. Then positions 6, 7 stay in block 2; 8 needs a third.
    assert_eq!(sent(&mut s), (vec![0, 1], false, vec![]));
    assert_eq!(sent(&mut s), (vec![], true, vec![]));
    assert_eq!(sent(&mut s), (vec![], true, vec![]));
    assert_eq!(sent(&mut s), (vec![2], true, vec![]));
    // Once it ends, the next plan tells the ranks to forget it.
    assert!(s.abort(1));
    s.add(Sequence::new(2, vec![2; 2], params(2))).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(plan.finished_seq_ids, vec![1]);
    assert!(!plan.seqs[0].append_blocks);
}

#[test]
fn penalties_carry_the_context_only_when_sampling() {
    let mut s = sched(16, 4, 4);
    let mut p = params(4);
    p.sampling.presence_penalty = 0.5;
    s.add(Sequence::new(1, vec![3, 4, 5, 6, 7, 8], p)).unwrap();
    let (plan, _) = step(&mut s);
    assert!(plan.seqs[0].context_token_ids.is_empty());
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs[0].context_token_ids, vec![3, 4, 5, 6, 7, 8]);
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs[0].context_token_ids, vec![3, 4, 5, 6, 7, 8, 2]);
    assert_eq!(plan.seqs[0].sampling.as_ref().unwrap().output_index, 1);
}

#[test]
fn priorities_order_the_queue_and_fcfs_holds_within_one() {
    // Room for one sequence at a time.
    let mut s = Scheduler::new(
        BlockManager::new(2, 4),
        SchedulerConfig {
            max_running: 1,
            ..config(64)
        },
    );
    for (id, priority) in [(1, 5), (2, 0), (3, 5), (4, -1)] {
        let p = SequenceParams {
            priority,
            ..params(1)
        };
        s.add(Sequence::new(id, vec![1; 3], p)).unwrap();
    }
    let mut order = Vec::new();
    while let Some(plan) = s.schedule().unwrap() {
        order.push(plan.seqs[0].seq_id);
        s.apply(answer(&plan)).unwrap();
    }
    assert_eq!(order, vec![4, 2, 1, 3]);
}

#[test]
fn out_of_blocks_the_newest_is_preempted_and_recomputes_with_its_tokens() {
    // 3 blocks of 4: two sequences of 4 + 4 positions cannot both finish.
    let mut s = sched(3, 4, 64);
    s.add(Sequence::new(1, vec![1, 2, 3], params(5))).unwrap();
    s.add(Sequence::new(2, vec![4, 5, 6], params(5))).unwrap();
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut preempted_plan = None;
    while let Some(plan) = s.schedule().unwrap() {
        if s.stats().preemptions > 0 && preempted_plan.is_none() {
            preempted_plan = Some(plan.clone());
        }
        for t in s.apply(answer(&plan)).unwrap() {
            tokens
                .entry(t.token.seq_id)
                .or_default()
                .push(t.token.token_id);
        }
        s.audit().unwrap();
    }
    assert!(s.stats().preemptions >= 1);
    assert_eq!(tokens[&1], vec![2; 5]);
    assert_eq!(
        tokens[&2],
        vec![3; 5],
        "the preempted one still gets all its tokens"
    );
    assert_eq!(s.stats().kv_blocks_free as usize, 3);
    // The older sequence kept running when the newer one was preempted.
    let plan = preempted_plan.unwrap();
    assert!(plan.seqs.iter().any(|q| q.seq_id == 1));
    assert!(plan.seqs.iter().all(|q| q.seq_id != 2));
}

#[test]
fn a_recomputed_sequence_resumes_at_its_output_index() {
    // Without the prefix cache, which would give it back its first block.
    let mut s = Scheduler::new(
        BlockManager::new(3, 4),
        SchedulerConfig {
            prefix_caching: false,
            ..config(64)
        },
    );
    s.add(Sequence::new(1, vec![1, 2, 3], params(5))).unwrap();
    s.add(Sequence::new(2, vec![4, 5, 6], params(5))).unwrap();
    let mut resumed = None;
    while let Some(plan) = s.schedule().unwrap() {
        if let Some(q) = plan
            .seqs
            .iter()
            .find(|q| q.seq_id == 2 && q.start_pos == 0 && s.stats().preemptions > 0)
        {
            resumed.get_or_insert(q.clone());
        }
        s.apply(answer(&plan)).unwrap();
    }
    let q = resumed.expect("sequence 2 ran again from position 0");
    let generated = q.token_ids.len() - 3;
    assert!(
        generated >= 1,
        "it recomputes its output too: {:?}",
        q.token_ids
    );
    assert_eq!(&q.token_ids[..3], &[4, 5, 6]);
    assert!(q.token_ids[3..].iter().all(|&t| t == 3));
    assert_eq!(q.sampling.unwrap().output_index as usize, generated);
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = sched(32, 4, 64);
    let system: Vec<u32> = (10..30).collect();
    let prompt = |tail: u32| -> Vec<u32> { system.iter().copied().chain([tail, tail]).collect() };
    s.add(Sequence::new(1, prompt(1), params(2))).unwrap();
    let (first, _) = step(&mut s);
    assert_eq!(first.seqs[0].token_ids.len(), 22);
    s.add(Sequence::new(2, prompt(2), params(2))).unwrap();
    let (plan, _) = step(&mut s);
    let q = plan.seqs.iter().find(|q| q.seq_id == 2).unwrap();
    assert_eq!(q.start_pos, 20, "five full blocks came from the cache");
    assert_eq!(q.token_ids, vec![2, 2]);
    assert_eq!(&q.block_table[..5], &first.seqs[0].block_table[..5]);
    assert_eq!(s.stats().prefix_hit_tokens, 20);
    assert_eq!(s.stats().prefix_query_tokens, 44);
    // The same prompt whole: every full block but the one holding the last token.
    while s
        .schedule()
        .unwrap()
        .is_some_and(|p| s.apply(answer(&p)).is_ok())
    {}
    s.add(Sequence::new(
        3,
        vec![10, 11, 12, 13, 14, 15, 16, 17],
        params(1),
    ))
    .unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs[0].start_pos, 4);
    assert_eq!(plan.seqs[0].token_ids, vec![14, 15, 16, 17]);
}

#[test]
fn with_a_step_in_flight_the_next_feeds_its_tokens_by_reference() {
    let mut s = sched(16, 4, 64);
    s.add(Sequence::new(1, vec![1, 2, 3], params(3))).unwrap();
    let first = s.schedule().unwrap().unwrap();
    // Planned before the first is answered.
    let second = s.schedule().unwrap().unwrap();
    let q = &second.seqs[0];
    assert!(q.feed_sampled && q.token_ids.is_empty());
    assert_eq!(
        (q.start_pos, q.sampling.as_ref().unwrap().output_index),
        (3, 1)
    );
    assert!(s.schedule().is_err(), "at most two unanswered steps");
    assert_eq!(s.apply(answer(&first)).unwrap()[0].finish, None);
    // Max 3 tokens: two sampled or pending, so the third plan is the last.
    let third = s.schedule().unwrap().unwrap();
    assert!(third.seqs[0].feed_sampled);
    s.apply(answer(&second)).unwrap();
    assert!(
        s.schedule().unwrap().is_none(),
        "its last token is on its way"
    );
    let out = s.apply(answer(&third)).unwrap();
    assert_eq!(out[0].finish, Some(FinishReason::Length));
    assert!(s.is_idle());
    s.audit().unwrap();
}

#[test]
fn an_answer_for_an_aborted_sequence_is_dropped() {
    let mut s = sched(16, 4, 64);
    s.add(Sequence::new(1, vec![1, 2, 3], params(8))).unwrap();
    s.add(Sequence::new(2, vec![1, 2, 3], params(8))).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    assert!(s.abort(1));
    let out = s.apply(answer(&plan)).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].token.seq_id, 2);
    s.audit().unwrap();
}

#[test]
fn deadlines_drop_sequences_wherever_they_are() {
    let mut s = sched(16, 4, 64);
    let now = Instant::now();
    let late = SequenceParams {
        deadline: Some(now),
        ..params(8)
    };
    s.add(Sequence::new(1, vec![1, 2, 3], late.clone()))
        .unwrap();
    step(&mut s);
    s.add(Sequence::new(2, vec![1, 2, 3], late)).unwrap();
    s.add(Sequence::new(3, vec![1, 2, 3], params(8))).unwrap();
    let mut gone = s.expire(now);
    gone.sort();
    assert_eq!(gone, vec![1, 2]);
    assert_eq!((s.stats().running, s.stats().waiting), (0, 1));
    assert_eq!(s.stats().kv_blocks_free as usize, 16);
    s.audit().unwrap();
}

#[test]
fn logits_travel_only_for_the_sequences_that_ask_and_only_when_sampled() {
    let mut s = sched(64, 4, 6);
    let asks = SequenceParams {
        return_logits: true,
        ..params(2)
    };
    s.add(Sequence::new(1, vec![5; 9], asks)).unwrap();
    s.add(Sequence::new(2, vec![6; 3], params(2))).unwrap();
    // A fake rank 0 that returns a row for every sequence when asked, as the worker does.
    let with_logits = |plan: &StepPlan| {
        let mut r = answer(plan);
        if plan.return_logits {
            r.logits = plan
                .seqs
                .iter()
                .map(|q| helios_proto::v1::Logits {
                    seq_id: q.seq_id,
                    values: vec![q.seq_id as f32; 3],
                })
                .collect();
        }
        r
    };
    // The first step reads only part of sequence 1's prompt: nothing of it is sampled yet.
    let plan = s.schedule().unwrap().unwrap();
    assert!(!plan.return_logits, "{plan:?}");
    assert!(s.apply(with_logits(&plan)).unwrap().is_empty());
    let mut rows = Vec::new();
    while let Some(plan) = s.schedule().unwrap() {
        let sampling_1 = plan.seqs.iter().any(|q| q.seq_id == 1 && q.sample);
        assert_eq!(plan.return_logits, sampling_1, "{plan:?}");
        for t in s.apply(with_logits(&plan)).unwrap() {
            rows.push((t.token.seq_id, t.logits));
        }
        s.audit().unwrap();
    }
    assert!(rows.contains(&(1, Some(vec![1.0; 3]))), "{rows:?}");
    assert!(rows.iter().filter(|r| r.0 == 1).all(|r| r.1.is_some()));
    assert!(rows.iter().filter(|r| r.0 == 2).all(|r| r.1.is_none()));
    assert_eq!(rows.len(), 4, "two tokens each: {rows:?}");
}

#[test]
fn requeued_after_a_lost_rank_every_sequence_recomputes_and_samples_on() {
    // Answers that depend on the length a sequence reaches (a seeded sampler's output
    // index): a lost or repeated token would show.
    let answer_by_context = |plan: &StepPlan| {
        answer_with(plan, |q| {
            let len = q.start_pos + q.token_ids.len() as u32 + u32::from(q.feed_sampled);
            (q.seq_id as u32 * 7 + len) % 50 + 1
        })
    };
    let run = |lose_at: Option<usize>| {
        let mut s = sched(32, 4, 6);
        for id in 1..=3 {
            s.add(Sequence::new(id, vec![id as u32; 9], params(6)))
                .unwrap();
        }
        let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut steps = 0;
        let mut in_flight: VecDeque<StepPlan> = VecDeque::new();
        loop {
            // Two steps in flight, as with overlap: the older is answered after the newer is
            // planned.
            while in_flight.len() < 2 {
                match s.schedule().unwrap() {
                    Some(plan) => in_flight.push_back(plan),
                    None => break,
                }
            }
            let Some(plan) = in_flight.pop_front() else {
                break;
            };
            steps += 1;
            if Some(steps) == lose_at {
                // The ranks are lost with both steps unanswered.
                let running = s.requeue_all();
                assert!(!running.is_empty());
                in_flight.clear();
                s.audit().unwrap();
                assert_eq!(s.stats().running, 0);
                assert_eq!(s.stats().kv_blocks_free, 32);
                continue;
            }
            for t in s.apply(answer_by_context(&plan)).unwrap() {
                tokens
                    .entry(t.token.seq_id)
                    .or_default()
                    .push(t.token.token_id);
            }
            s.audit().unwrap();
        }
        assert!(s.is_idle());
        (tokens, s.stats())
    };
    let (undisturbed, _) = run(None);
    for lose_at in [2, 4, 6, 9] {
        let (tokens, stats) = run(Some(lose_at));
        assert_eq!(tokens, undisturbed, "lost at step {lose_at}");
        assert!(stats.requeued >= 1);
        assert_eq!(stats.kv_blocks_free, 32);
    }
}

#[test]
fn moved_to_another_replica_every_sequence_samples_on_at_its_output_index() {
    // A fake rank 0 that samples like the real one: from (seed, output index) only. A seed
    // that changed, or an output index off by one, would show in the tokens.
    let seeded = |plan: &StepPlan| {
        answer_with(plan, |q| {
            let p = q.sampling.as_ref().expect("sampling");
            // As the worker does: an unseeded sequence samples with its id.
            let seed = p.seed.unwrap_or(q.seq_id) as u32;
            (seed * 31 + p.output_index * 7) % 50 + 1
        })
    };
    let drive = |s: &mut Scheduler, tokens: &mut HashMap<u64, Vec<u32>>, steps: usize| {
        for _ in 0..steps {
            let Some(plan) = s.schedule().unwrap() else {
                return;
            };
            for t in s.apply(seeded(&plan)).unwrap() {
                tokens
                    .entry(t.token.seq_id)
                    .or_default()
                    .push(t.token.token_id);
            }
            s.audit().unwrap();
        }
    };
    let add_all = |s: &mut Scheduler| {
        for id in 1..=3u64 {
            let mut p = params(6);
            // Sequence 3 has no seed: it samples with its id, and must keep it when it moves.
            p.sampling.seed = (id != 3).then_some(100 + id);
            s.add(Sequence::new(id, vec![id as u32; 9], p)).unwrap();
        }
    };
    let mut undisturbed = HashMap::new();
    let mut a = sched(32, 4, 8);
    add_all(&mut a);
    drive(&mut a, &mut undisturbed, 100);
    assert!(a.is_idle());

    for moved_after in [1, 3, 5] {
        let mut tokens = HashMap::new();
        let mut a = sched(32, 4, 8);
        add_all(&mut a);
        drive(&mut a, &mut tokens, moved_after);
        // Replica A is lost: everything moves to B under new sequence ids.
        let departing = a.take_all();
        assert!(a.is_idle());
        assert_eq!(a.stats().kv_blocks_free, 32, "A keeps nothing");
        let mut b = Scheduler::new(
            BlockManager::new(32, 4),
            SchedulerConfig {
                max_waiting: 0, // a moved sequence is not held to the waiting limit
                ..config(8)
            },
        );
        let mut new_ids = HashMap::new();
        for (i, (old, d)) in departing.into_iter().enumerate() {
            assert_eq!(d.prompt_len, 9);
            assert_eq!(
                &d.tokens[9..],
                tokens.get(&old).map_or(&[][..], Vec::as_slice)
            );
            assert_eq!(
                d.params.sampling.seed,
                Some(if old == 3 { 3 } else { 100 + old })
            );
            let new = 50 + i as u64;
            b.add_resumed(new, d).unwrap();
            new_ids.insert(new, old);
        }
        let mut on_b = HashMap::new();
        drive(&mut b, &mut on_b, 100);
        assert!(b.is_idle());
        assert_eq!(b.stats().kv_blocks_free, 32);
        for (new, more) in on_b {
            tokens.entry(new_ids[&new]).or_default().extend(more);
        }
        assert_eq!(tokens, undisturbed, "moved after {moved_after} steps");
    }
}

#[test]
fn further_choices_wait_for_the_leaders_prompt_then_take_its_blocks() {
    // A 10-token prompt in blocks of 4: two full blocks to share; a budget of 6 makes the
    // leader read it in two steps.
    let mut s = sched(64, 4, 6);
    let prompt: Vec<u32> = (1..=10).collect();
    let choices = (0..3)
        .map(|i| {
            let seq = Sequence::new(i, prompt.clone(), params(2));
            if i == 0 {
                seq
            } else {
                seq.following(0)
            }
        })
        .collect();
    s.add_all(choices).unwrap();
    let ids = |plan: &StepPlan| plan.seqs.iter().map(|q| q.seq_id).collect::<Vec<_>>();
    // The leader alone until its prompt's full blocks are answered (cached).
    let (plan, _) = step(&mut s);
    assert_eq!(ids(&plan), [0]);
    let (plan, _) = step(&mut s);
    assert_eq!(ids(&plan), [0]);
    assert_eq!(s.stats().prefix_hit_tokens, 0);
    // Both followers now take the two cached blocks and compute only the rest.
    let (plan, _) = step(&mut s);
    assert_eq!(ids(&plan), [0, 1, 2]);
    let follower = &plan.seqs[1];
    assert_eq!((follower.start_pos, follower.token_ids.len()), (8, 2));
    assert_eq!(s.stats().prefix_hit_tokens, 2 * 8);
}

#[test]
fn a_follower_whose_leader_is_gone_simply_runs() {
    let mut s = sched(64, 4, 4);
    let prompt: Vec<u32> = (1..=10).collect();
    s.add_all(vec![
        Sequence::new(0, prompt.clone(), params(2)),
        Sequence::new(1, prompt, params(2)).following(0),
    ])
    .unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs.len(), 1);
    assert!(s.abort(0));
    let (plan, _) = step(&mut s);
    assert_eq!(plan.seqs[0].seq_id, 1);
}

#[test]
fn a_requests_choices_are_queued_all_or_none() {
    let mut s = Scheduler::new(
        BlockManager::new(64, 4),
        SchedulerConfig {
            max_waiting: 3,
            ..config(8)
        },
    );
    s.add(Sequence::new(0, vec![1; 5], params(2))).unwrap();
    let three = (1..4)
        .map(|i| Sequence::new(i, vec![1; 5], params(2)))
        .collect();
    assert!(matches!(s.add_all(three), Err(AddError::QueueFull(1))));
    assert_eq!(s.stats().waiting, 1, "none of the three was queued");
    let two = (1..3)
        .map(|i| Sequence::new(i, vec![1; 5], params(2)))
        .collect();
    s.add_all(two).unwrap();
    assert_eq!(s.stats().waiting, 3);
}

/// [`answer`], with each scored prompt token's logprob minus its position: a test can tell
/// which position an entry came from.
fn scoring_answer(plan: &StepPlan) -> StepResult {
    let mut r = answer(plan);
    let scored = plan.seqs.iter().filter(|s| s.prompt_logprobs.is_some());
    for (pl, seq) in r.prompt_logprobs.iter_mut().zip(scored) {
        for (k, t) in pl.tokens.iter_mut().enumerate() {
            if let Some(s) = t.sampled.as_mut() {
                s.logprob = -((seq.start_pos as usize + 1 + k) as f32);
            }
        }
    }
    r
}

/// Runs `s` until sequence `id` samples its first token; returns the plans' steps of `id` and
/// that token.
fn until_first_token(s: &mut Scheduler, id: u64) -> (Vec<SequenceStep>, Sampled) {
    let mut steps = Vec::new();
    for _ in 0..50 {
        let plan = s.schedule().unwrap().unwrap();
        steps.extend(plan.seqs.iter().filter(|q| q.seq_id == id).cloned());
        let out = s.apply(scoring_answer(&plan)).unwrap();
        s.audit().unwrap();
        if let Some(t) = out.into_iter().find(|t| t.token.seq_id == id) {
            return (steps, t);
        }
    }
    panic!("sequence {id} sampled nothing");
}

fn assert_prompt_scored(t: &Sampled, prompt: &[u32]) {
    let scores = t
        .prompt_logprobs
        .as_ref()
        .expect("prompt logprobs with the first token");
    assert_eq!(scores.len(), prompt.len() - 1);
    for (j, e) in scores.iter().enumerate() {
        let s = e.sampled.unwrap();
        assert_eq!(s.token_id, prompt[j + 1], "entry {j}");
        assert_eq!(
            s.logprob,
            -((j + 1) as f32),
            "entry {j} is position {}'s",
            j + 1
        );
    }
}

#[test]
fn prompt_logprobs_score_every_prompt_token_once_across_chunks_never_from_the_cache() {
    let mut s = sched(64, 4, 5);
    let prompt: Vec<u32> = (10..23).collect();
    // A first request puts the prompt's blocks in the prefix cache.
    s.add(Sequence::new(1, prompt.clone(), params(2))).unwrap();
    while let Some(plan) = s.schedule().unwrap() {
        s.apply(answer(&plan)).unwrap();
    }
    let before = s.stats();
    let mut p = params(3);
    p.prompt_logprobs = Some(2);
    s.add(Sequence::new(2, prompt.clone(), p)).unwrap();
    let (steps, first) = until_first_token(&mut s, 2);
    // Read whole, in chunks of 5: each chunk names the prompt token after it, the last none.
    let chunks: Vec<(u32, usize, Option<u32>, Option<u32>)> = steps
        .iter()
        .map(|q| {
            (
                q.start_pos,
                q.token_ids.len(),
                q.prompt_logprobs,
                q.next_prompt_token,
            )
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            (0, 5, Some(2), Some(prompt[5])),
            (5, 5, Some(2), Some(prompt[10])),
            (10, 3, Some(2), None),
        ]
    );
    assert_eq!(s.stats().prefix_query_tokens, before.prefix_query_tokens);
    assert_prompt_scored(&first, &prompt);
    // Later tokens neither score nor carry prompt logprobs.
    while let Some(plan) = s.schedule().unwrap() {
        assert!(plan.seqs.iter().all(|q| q.prompt_logprobs.is_none()));
        for t in s.apply(scoring_answer(&plan)).unwrap() {
            assert!(t.prompt_logprobs.is_none());
        }
    }
    assert!(s.is_idle());
}

#[test]
fn a_recomputed_prompt_keeps_the_scores_it_had_and_fills_in_the_rest() {
    let mut s = sched(64, 4, 5);
    let prompt: Vec<u32> = (30..42).collect();
    let mut p = params(2);
    p.prompt_logprobs = Some(0);
    s.add(Sequence::new(4, prompt.clone(), p)).unwrap();
    // One chunk answered, then the replica loses a rank: everything is recomputed from 0.
    let plan = s.schedule().unwrap().unwrap();
    s.apply(scoring_answer(&plan)).unwrap();
    assert_eq!(s.requeue_all(), vec![4]);
    let (steps, first) = until_first_token(&mut s, 4);
    assert_eq!(steps[0].start_pos, 0, "recomputed from the start");
    assert_prompt_scored(&first, &prompt);
}

#[test]
fn an_answer_with_the_wrong_prompt_scores_fails_the_step() {
    let mut s = sched(64, 4, 64);
    let mut p = params(2);
    p.prompt_logprobs = Some(1);
    s.add(Sequence::new(6, vec![3; 9], p)).unwrap();
    s.add(Sequence::new(7, vec![3; 9], params(2))).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    let mut short = answer(&plan);
    short.prompt_logprobs[0].tokens.pop();
    let failed = s.apply(short).unwrap_err();
    assert_eq!(failed.seq_ids, vec![6, 7]);
    assert!(s.is_idle());
}

#[test]
fn a_constrained_token_in_flight_pauses_planning_until_its_answer() {
    use crate::constraint::{ConstraintSpec, GrammarOptions, Grammars};
    let tok = crate::tokenizer::tests::smollm2();
    let g = Grammars::new(tok, tok.vocab_size(), GrammarOptions::default()).unwrap();
    // A fake rank 0 that samples the first token a mask allows.
    let answer = |plan: &StepPlan| {
        answer_with(plan, |q| {
            let mask = &q.allowed_tokens;
            (0..mask.len() as u32 * 8)
                .find(|&t| mask[t as usize / 8] >> (t % 8) & 1 == 1)
                .unwrap_or(q.seq_id as u32 + 1)
        })
    };
    let with = |constrained: bool| {
        let mut s = sched(64, 4, 64);
        s.add(Sequence::new(1, vec![5; 3], params(8))).unwrap();
        if constrained {
            let mut p = params(8);
            let spec = ConstraintSpec::Regex("[a-z]{4}".into());
            p.constraint = Some(g.compile(&spec).unwrap());
            s.add(Sequence::new(2, vec![5; 3], p)).unwrap();
        }
        s
    };
    // Unconstrained, the next step is planned while one is in flight.
    let mut s = with(false);
    s.schedule().unwrap().unwrap();
    assert!(s.schedule().unwrap().is_some(), "overlap");
    // With a constrained sequence in the step in flight, nothing is planned until its answer.
    let mut s = with(true);
    let first = s.schedule().unwrap().unwrap();
    assert!(first.seqs.iter().any(|q| !q.allowed_tokens.is_empty()));
    assert!(
        s.schedule().unwrap().is_none(),
        "its next mask needs the token"
    );
    s.apply(answer(&first)).unwrap();
    let next = s.schedule().unwrap().expect("planned once answered");
    assert_eq!(next.seqs.len(), 2);
    s.audit().unwrap();
}
