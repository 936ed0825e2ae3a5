"""The planted-facts example, reduced: the sequence that states a fact is its most helpful one."""

from __future__ import annotations

import pytest
from planted_facts import ANSWER_POSITION, Ranks, main

pytestmark = pytest.mark.slow


def test_stating_sequence_ranks_first_for_facts_answered_correctly() -> None:
    ranks = main(["--facts", "12", "--distractors", "108", "--epochs", "100"])
    assert len(ranks.facts) >= 9  # the model answers most facts (12 of 12 when measured)
    assert Ranks.share(ranks.influence, 1) >= 0.9
    assert Ranks.share(ranks.influence, 5) >= 0.98
    # Influence does at least as well as a plain gradient dot product on the same parameters.
    assert Ranks.share(ranks.influence, 1) >= Ranks.share(ranks.dot_product, 1)
    # Within the stating sequence, the answer (the capital's token) carries the largest share.
    answer = [t == ANSWER_POSITION for t in ranks.top_token]
    assert sum(answer) >= 0.9 * len(answer)  # 12 of 12 when measured
