"""A Lambda function in plain Python, run by the official runtime interface client
(`awslambdaric`, PyPI) inside a sandscope process sandbox. `COUNT` is global state: it
survives warm invocations of the same sandbox."""
import os

COUNT = 0
print("init: module loaded", flush=True)


def handler(event, context):
    global COUNT
    COUNT += 1
    print("invocation %d of this sandbox (%s)" % (COUNT, context.aws_request_id), flush=True)
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError("asked to fail")
    return {
        "count": COUNT,
        "event": event,
        "function": context.function_name,
        "memory_mb": context.memory_limit_in_mb,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
    }
