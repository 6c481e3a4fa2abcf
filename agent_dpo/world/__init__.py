"""The example world: two example agents (a salon rebooking agent and a healthcare appointment-conflict
resolver), a deterministic call simulator that publishes their calls as a runtime would, and the
hidden rubric that decides what a good answer is (labels, offline judge, demo scoring)."""

from agent_dpo.world.agents import AGENTS, ExampleAgent, example_agent
from agent_dpo.world.rubric import RubricJudge, csat_from_scores, score_answer, thumbs_from_score
from agent_dpo.world.simulator import (
    LABELLED_BY,
    LivePrompt,
    count_by_type,
    live_feedback,
    live_prompts,
    publish_world,
    simulate,
)

__all__ = ["AGENTS", "LABELLED_BY", "ExampleAgent", "LivePrompt", "RubricJudge", "count_by_type",
           "csat_from_scores", "example_agent", "live_feedback", "live_prompts", "publish_world", "score_answer",
           "simulate", "thumbs_from_score"]
