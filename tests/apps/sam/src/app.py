import json
import os

import helper  # a sibling module of the CodeUri folder
import shared  # from the layer


def web(event, context):
    body = {
        # payload 1.0 (REST) events carry httpMethod; 2.0 ones a version
        "payload": "1.0" if "httpMethod" in event else event.get("version"),
        "keys": sorted(event),
        "resource_path": (event.get("requestContext") or {}).get("resourcePath"),
        "path_parameters": event.get("pathParameters"),
        "stage": os.environ["STAGE"],
        "table": os.environ["TABLE"],
        "greeting": os.environ["GREETING"],
        "helper": helper.NAME,
        "layer": shared.NAME,
        "task_root": os.environ["LAMBDA_TASK_ROOT"],
        "cwd": os.getcwd(),
    }
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps(body)}


def work(event, context):
    seen = []
    for record in event["Records"]:
        if "Sns" in record:
            seen.append({"sns": record["Sns"]["Message"]})
        else:
            seen.append({"sqs": record["body"]})
    # Without ReportBatchItemFailures in the template, this is not read: the
    # batch succeeded (as on Lambda).
    failures = [{"itemIdentifier": r["messageId"]} for r in event["Records"]
                if r.get("body") == "report-me"]
    return {"seen": seen, "batchItemFailures": failures}


def fail(event, context):
    raise RuntimeError("no luck: " + event["order"])


def tick(event, context):
    if "httpMethod" in event:  # GET /orders, beside the Web function's ANY /orders
        return {"statusCode": 200, "body": json.dumps({"listed_by": context.function_name})}
    return {"event": event}
