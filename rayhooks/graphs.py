"""`save_graph_def=True` in TF2: the step function's traced graph, when it has one."""

import logging

logger = logging.getLogger("rayhooks")


def traced_graph_def(step_fn):
    """The GraphDef of a `tf.function` step's latest trace, or None for a plain Python step."""
    concrete = getattr(step_fn, "_list_all_concrete_functions", None)
    if concrete is None:
        return None
    functions = concrete()
    if not functions:
        return None
    return functions[-1].graph.as_graph_def(add_shapes=True)


def write_step_graph(step_fn, storage, summary_writer) -> bool:
    """Writes `graph.pbtxt` and a graph event for TensorBoard; False for a plain Python step."""
    graph_def = traced_graph_def(step_fn)
    if graph_def is None:
        logger.info("the step function is not a tf.function, so there is no graph to save "
                    "(save_graph_def has no effect)")
        return False
    from google.protobuf import text_format
    storage.write_bytes("graph.pbtxt", text_format.MessageToString(graph_def).encode())
    summary_writer.add_graph(graph_def.SerializeToString())
    return True
