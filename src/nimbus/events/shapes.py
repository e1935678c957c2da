"""The AWS event shapes handlers get from async triggers. Pure functions.

* queue messages: SQS ``Records[]`` (``messageId``, ``body``, ``attributes``);
* topic messages: SNS ``Records[].Sns``;
* schedule ticks: the EventBridge "Scheduled Event";
* destinations: Lambda's destination record (``requestContext``,
  ``requestPayload``, ``responsePayload``).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from nimbus.region import region
from nimbus.store.queue import Message
from nimbus.worker.target import ACCOUNT


def iso(ts: float, *, millis: bool = False) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    if millis:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def sqs_record(m: Message, queue: str, now: float) -> dict[str, Any]:
    body = m.body.decode("utf-8", "replace")
    return {
        "messageId": m.id,
        "receiptHandle": f"{m.id}:{m.receipt}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(m.attempts),
            "SentTimestamp": str(int(m.enqueued_at * 1000)),
            "SenderId": ACCOUNT,
            "ApproximateFirstReceiveTimestamp": str(int(now * 1000)),
        },
        "messageAttributes": {k: {"stringValue": v, "dataType": "String"}
                              for k, v in m.attributes.items() if not k.startswith("nimbus.")},
        "md5OfBody": hashlib.md5(m.body, usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{region()}:{ACCOUNT}:{queue}",
        "awsRegion": region(),
    }


def sqs_event(messages: list[Message], queue: str, now: float) -> dict[str, Any]:
    return {"Records": [sqs_record(m, queue, now) for m in messages]}


def sns_event(m: Message, topic: str, function: str) -> dict[str, Any]:
    arn = f"arn:aws:sns:{region()}:{ACCOUNT}:{topic}"
    return {"Records": [{
        "EventSource": "aws:sns",
        "EventVersion": "1.0",
        "EventSubscriptionArn": f"{arn}:{function}",
        "Sns": {
            "Type": "Notification",
            "MessageId": m.attributes.get("nimbus.message_id", m.id),
            "TopicArn": arn,
            "Subject": m.attributes.get("nimbus.subject"),
            "Message": m.body.decode("utf-8", "replace"),
            "Timestamp": iso(m.enqueued_at, millis=True),
            "SignatureVersion": "1",
            "Signature": "",
            "SigningCertUrl": "",
            "UnsubscribeUrl": "",
            "MessageAttributes": {k: {"Type": "String", "Value": v}
                                  for k, v in m.attributes.items()
                                  if not k.startswith("nimbus.")},
        },
    }]}


def scheduled_event(event_id: str, function: str, rule: str, tick: float,
                    detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "0",
        "id": event_id,
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": iso(tick),
        "region": region(),
        "resources": [f"arn:aws:events:{region()}:{ACCOUNT}:rule/{function}-{rule}"],
        "detail": detail,
    }


def destination_record(*, request_id: str, function: str, condition: str, attempts: int,
                       payload: Any, response: Any, now: float,
                       error: bool) -> dict[str, Any]:
    """``condition``: ``Success``, ``RetriesExhausted`` or ``EventAgeExceeded``."""
    context: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
    if error:
        context["functionError"] = "Unhandled"
    return {
        "version": "1.0",
        "timestamp": iso(now, millis=True),
        "requestContext": {
            "requestId": request_id,
            "functionArn": f"arn:aws:lambda:{region()}:{ACCOUNT}:function:{function}:$LATEST",
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": payload,
        "responseContext": context,
        "responsePayload": response,
    }
