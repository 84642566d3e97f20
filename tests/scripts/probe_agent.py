"""Calls an agent the way an intruder on another host would, and prints what it answered.

``python probe_agent.py ENDPOINT FOREIGN_CREDENTIALS_DIR [JOB_CREDENTIALS_DIR]``: one JSON
object, ``{way: status code name}``, for a plain channel, a channel with another job's
credentials, and (given the job's) a channel with the job's certificate and a wrong token.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import grpc

from elastictrain.credentials import JobCredentials
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc
from elastictrain.rpc.agent_client import open_channel


def answer(channel: grpc.Channel) -> str:
    stub = etrain_pb2_grpc.AgentStub(channel)
    try:
        stub.InjectFault(etrain_pb2.InjectFaultRequest(rank=0), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()
    return "OK"


def main() -> None:
    endpoint, foreign = sys.argv[1], JobCredentials.load(sys.argv[2])
    found = {"plain": answer(grpc.insecure_channel(endpoint)),
             "another job's credentials": answer(open_channel(endpoint, foreign))}
    if len(sys.argv) > 3:
        stolen = replace(JobCredentials.load(sys.argv[3]), token="x" * 43)
        found["the job's certificate, a wrong token"] = answer(open_channel(endpoint, stolen))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
