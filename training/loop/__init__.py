"""The training step as small components, each with one job; `training.trainer` wires
them and runs the loop.

    engine.Engine              the model under DeepSpeed and its optimizer
    feed.DataFeed              this rank's train batches, and where the data stands
    comm.Collectives           small host-side collectives over gloo
    step.Stepper               one optimizer step → a `StepResult`
    evaluator.Evaluator        the val loss, on the same val samples every time
    checkpointer.Checkpointer  a checkpoint of the state after a step
    guard.RunGuard             bad steps, heartbeats, the hang watchdog, events
"""
