"""The summarise step, in the order a video goes through it: claim (video_state.claim(step=summarise)) → prompt
(prompt.PromptBuilder, split) → plan (plan.SummaryPlan: one prompt or map-reduce) → chunk and
generate (workers/gpu/) → store (store.store_batch). tasks.py is the Celery glue."""
