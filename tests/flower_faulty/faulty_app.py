"""A deliberately faulty ClientApp for tests/test_flower.py: fl_sparse's honest ClientApp, except that a
SuperNode whose node config says ``fault-plan="ROUND=FAULT ..."`` damages its reply in those rounds
(faults: flower_faults.py)."""

from flower_faults import tamper
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import message_size_mod

from fl_sparse.flower import clientapp

app = ClientApp(mods=[message_size_mod])
app.query()(clientapp.query)


@app.train()
def train(msg, context):
    reply = clientapp.train(msg, context)
    plan = dict(item.split("=", 1) for item in str(context.node_config.get("fault-plan", "")).split())
    fault = plan.get(msg.metadata.group_id)
    return tamper(reply, fault) if fault else reply
