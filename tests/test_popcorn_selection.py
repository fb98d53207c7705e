"""POPCORN's proximity graph (eq. 6), selection (eq. 7), the random-selection ablation and default schedule."""

import math

import numpy as np
import pytest

from nnunet_ssl.methods.popcorn.selection import (
    ScheduleError,
    derive_schedule,
    proximity_matrix,
    proximity_scores,
    select_closest,
    select_random,
)


def test_proximity_matrix_eq6_by_hand():
    unlabeled = np.array([[0.0, 0.0], [3.0, 4.0]])
    training = np.array([[3.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
    expected = np.array([[3.0, 4.0, 5.0], [4.0, 3.0, 0.0]])  # Euclidean, not squared
    assert np.allclose(proximity_matrix(unlabeled, training), expected)


def test_selection_eq7_on_a_hand_made_matrix():
    cases = ["u_a", "u_b", "u_c", "u_d"]
    #              t0   t1   t2
    p = np.array([[1.0, 5.0, 2.0],   # p=2: 1 + 2 = 3
                  [4.0, 0.5, 0.5],   # 1
                  [2.0, 1.0, 9.0],   # 3 (tie with u_a)
                  [0.1, 7.0, 8.0]])  # 7.1
    scores = proximity_scores(p, 2)
    assert np.allclose(scores, [3.0, 1.0, 3.0, 7.1])
    assert [cases[i] for i in select_closest(scores, cases, 2)] == ["u_b", "u_a"]  # tie: by identifier
    assert [cases[i] for i in select_closest(scores, cases, 3)] == ["u_b", "u_a", "u_c"]
    # the tie is broken by identifier, not by position in the list
    rev = cases[::-1]
    assert [rev[i] for i in select_closest(scores[::-1], rev, 2)] == ["u_b", "u_a"]
    # p = 1: the nearest training case only
    assert [cases[i] for i in select_closest(proximity_scores(p, 1), cases, 1)] == ["u_d"]
    # p larger than the training set: the sum over all three
    assert np.allclose(proximity_scores(p, 5), p.sum(1))
    assert [cases[i] for i in select_closest(proximity_scores(p, 5), cases, 4)] == ["u_b", "u_a", "u_c", "u_d"]
    # K larger than what is left: all of them
    assert len(select_closest(scores, cases, 10)) == 4


def test_random_selection_draws_every_case_alike_and_ignores_list_order():
    cases = ["u_c", "u_a", "u_d", "u_b"]
    # the draw permutes the identifiers' sorted order: the same generator picks the same cases in any list order
    drawn = [cases[i] for i in select_random(cases, 2, np.random.default_rng(3))]
    shuffled = ["u_b", "u_d", "u_a", "u_c"]
    assert [shuffled[i] for i in select_random(shuffled, 2, np.random.default_rng(3))] == drawn
    order = sorted(cases)
    assert drawn == [order[i] for i in np.random.default_rng(3).permutation(4)[:2]]
    assert sorted(select_random(cases, 10, np.random.default_rng(0))) == [0, 1, 2, 3]  # K > what is left: all
    # uniform: over 4000 draws of one case each is drawn about 1000 times (binomial std ~27)
    counts = np.zeros(4)
    for seed in range(4000):
        counts[select_random(cases, 1, np.random.default_rng(seed))[0]] += 1
    assert np.all(np.abs(counts - 1000) < 120), counts


def test_default_schedule_integrates_everything():
    # the paper's scale: M = 2901 unlabeled, nnU-Net's 1000 epochs
    s = derive_schedule(2901, 1000)
    assert s.first_step_epochs == 500 and s.selection_size == math.ceil(2901 / 15) and s.num_rounds == 15
    assert s.epochs_per_round == 500 // 15 and s.round_epochs[-1] + s.epochs_per_round <= 1000
    for m in (1, 4, 14, 15, 16, 100, 3000):
        for epochs in (2, 3, 4, 7, 50, 1000):
            s = derive_schedule(m, epochs)
            assert s.selection_size * s.num_rounds >= m > s.selection_size * (s.num_rounds - 1)
            assert s.epochs_per_round >= 1 and 1 <= s.first_step_epochs < epochs
            assert s.round_epochs[-1] + s.epochs_per_round <= epochs  # the last cases get N epochs too
            assert s.round_epochs == sorted(set(s.round_epochs))  # at most one round per epoch
    # a small run: 4 unlabeled, 4 epochs -> E1 = 2, K = ceil(4 / 2) = 2, 2 rounds at epochs 2 and 3
    s = derive_schedule(4, 4)
    assert (s.first_step_epochs, s.selection_size, s.num_rounds, s.epochs_per_round) == (2, 2, 2, 1)
    assert s.round_epochs == [2, 3]
    # 5 epochs: E1 = round(2.5) = 2 (half to even), K = ceil(4 / 3) = 2, N = floor(3 / 2) = 1
    s = derive_schedule(4, 5)
    assert (s.first_step_epochs, s.selection_size, s.epochs_per_round, s.round_epochs) == (2, 2, 1, [2, 3])


def test_explicit_schedule_values_are_kept_or_rejected():
    s = derive_schedule(10, 100, selection_size=3, epochs_per_round=5, first_step_epochs=40, num_neighbors=2)
    assert s.num_rounds == 4 and s.round_epochs == [40, 45, 50, 55] and s.num_neighbors == 2
    s = derive_schedule(10, 100, selection_size=3)  # E1 = 50, 4 rounds in the other 50 epochs
    assert s.epochs_per_round == 50 // 4 and s.round_epochs == [50, 62, 74, 86]
    with pytest.raises(ScheduleError, match="last round would start at epoch 100"):
        derive_schedule(10, 100, selection_size=1, epochs_per_round=10, first_step_epochs=10)
    with pytest.raises(ScheduleError, match="selection_size"):
        derive_schedule(10, 5, selection_size=1)  # 10 rounds in 4 epochs
    with pytest.raises(ScheduleError, match="first_step_epochs = 5"):
        derive_schedule(10, 5, first_step_epochs=5)
    with pytest.raises(ScheduleError, match="num_epochs >= 2"):
        derive_schedule(10, 1)
