"""The rankd RPC wire format (docs/protocol.md): frame headers and FlatBuffers bodies."""
import struct

import flatbuffers

from .errors import ProtocolError
from . import rpc_generated as g
from .rpc_generated import Kind

HEADER = struct.Struct("<2sBBHHQI")
HEADER_LEN = HEADER.size  # 20
MAGIC = b"RK"
VERSION = 1

SCORE_REQUEST = 1
SCORE_RESPONSE = 2
PING = 3
PONG = 4
STATUS_REQUEST = 5
STATUS_RESPONSE = 6
ERROR = 7


def frame(msg_type, request_id, body=b""):
    """One frame: the 20-byte header, then the body."""
    return HEADER.pack(MAGIC, VERSION, msg_type, 0, 0, request_id, len(body)) + bytes(body)


def parse_header(data):
    """(message type, request id, body length) of a 20-byte header."""
    magic, version, msg_type, _flags, reserved, request_id, length = HEADER.unpack(data)
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise ProtocolError(f"not a rankd frame header: {bytes(data)!r}")
    return msg_type, request_id, length


def _kind(values):
    """The Kind of a column or value from its Python values (None = missing)."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            raise TypeError("booleans are not a feature type; send 0/1 as int")
        if isinstance(v, int):
            kinds.add(Kind.I64)
        elif isinstance(v, float):
            kinds.add(Kind.F64)
        elif isinstance(v, str):
            kinds.add(Kind.Str)
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                kinds.add(Kind.I64List if v else None)
            elif all(isinstance(x, str) for x in v):
                kinds.add(Kind.StrList)
            else:
                raise TypeError(f"a list feature holds ints or strings, not {v!r}")
        elif hasattr(v, "item"):  # numpy scalar
            kinds.add(_kind([v.item()]))
        else:
            raise TypeError(f"unsupported feature value {v!r}")
    kinds.discard(None)
    if kinds == {Kind.I64, Kind.F64}:
        return Kind.F64
    if kinds == {Kind.I64List, Kind.StrList}:
        raise TypeError("a column mixes int and string lists")
    if len(kinds) > 1:
        raise TypeError(f"a column mixes value types: {sorted(kinds)}")
    return kinds.pop() if kinds else (Kind.StrList if any(v == [] for v in values) else Kind.Missing)


def _item(v):
    return v.item() if hasattr(v, "item") else v


def _strings(b, values):
    offs = [b.CreateString(s) for s in values]
    b.StartVector(4, len(offs), 4)
    for o in reversed(offs):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _scalars(b, values, prepend, width):
    b.StartVector(width, len(values), width)
    for v in reversed(values):
        prepend(v)
    return b.EndVector()


def _feature(b, name, value):
    value = _item(value)
    kind = _kind([value])
    n = b.CreateString(name)
    strs = i64s = s = None
    if kind == Kind.Str:
        s = b.CreateString(value)
    elif kind == Kind.I64List:
        i64s = _scalars(b, [int(x) for x in value], b.PrependInt64, 8)
    elif kind == Kind.StrList:
        strs = _strings(b, list(value))
    g.FeatureStart(b)
    g.FeatureAddName(b, n)
    g.FeatureAddKind(b, kind)
    if kind == Kind.F64:
        g.FeatureAddF64(b, float(value))
    elif kind == Kind.I64:
        g.FeatureAddI64(b, int(value))
    if s is not None:
        g.FeatureAddStr(b, s)
    if i64s is not None:
        g.FeatureAddI64s(b, i64s)
    if strs is not None:
        g.FeatureAddStrs(b, strs)
    return g.FeatureEnd(b)


def _column(b, name, values, n):
    values = [_item(v) for v in values]
    if len(values) != n:
        raise ValueError(f"column `{name}` has {len(values)} values for {n} items")
    kind = _kind(values)
    missing = [v is None for v in values]
    nm = b.CreateString(name)
    f64s = i64s = strs = offsets = bitmap = None
    if kind == Kind.F64:
        f64s = _scalars(b, [0.0 if v is None else float(v) for v in values], b.PrependFloat64, 8)
    elif kind == Kind.I64:
        i64s = _scalars(b, [0 if v is None else int(v) for v in values], b.PrependInt64, 8)
    elif kind == Kind.Str:
        strs = _strings(b, ["" if v is None else v for v in values])
    elif kind in (Kind.I64List, Kind.StrList):
        flat, offs = [], [0]
        for v in values:
            flat.extend(v or [])
            offs.append(len(flat))
        if kind == Kind.I64List:
            i64s = _scalars(b, [int(x) for x in flat], b.PrependInt64, 8)
        else:
            strs = _strings(b, flat)
        offsets = _scalars(b, offs, b.PrependUint32, 4)
    if any(missing):
        bits = bytearray((n + 7) // 8)
        for i, m in enumerate(missing):
            if m:
                bits[i // 8] |= 1 << (i % 8)
        bitmap = b.CreateByteVector(bytes(bits))
    g.ItemColumnStart(b)
    g.ItemColumnAddName(b, nm)
    g.ItemColumnAddKind(b, kind)
    for add, v in ((g.ItemColumnAddF64s, f64s), (g.ItemColumnAddI64s, i64s),
                   (g.ItemColumnAddStrs, strs), (g.ItemColumnAddOffsets, offsets),
                   (g.ItemColumnAddMissing, bitmap)):
        if v is not None:
            add(b, v)
    return g.ItemColumnEnd(b)


def encode_score_request(model, items=None, user=None, columns=None, num_items=None, version=0,
                         label="", routing_key="", deadline_us=0):
    """A ScoreRequest body. Items as a list of dicts (name -> value; absent or None: missing), or
    as `columns` (name -> list of per-item values) with `num_items`."""
    if columns is None:
        items = list(items or [])
        num_items = len(items)
        names = []
        for it in items:
            for k in it:
                if k not in names:
                    names.append(k)
        columns = {k: [it.get(k) for it in items] for k in names}
    elif num_items is None:
        num_items = len(next(iter(columns.values()))) if columns else 0
    b = flatbuffers.Builder(1024)
    cols = [_column(b, k, v, num_items) for k, v in columns.items()]
    feats = [_feature(b, k, v) for k, v in (user or {}).items() if v is not None]
    b.StartVector(4, len(cols), 4)
    for c in reversed(cols):
        b.PrependUOffsetTRelative(c)
    items_vec = b.EndVector()
    b.StartVector(4, len(feats), 4)
    for f in reversed(feats):
        b.PrependUOffsetTRelative(f)
    user_vec = b.EndVector()
    m = b.CreateString(model)
    lab = b.CreateString(label) if label else None
    key = b.CreateString(routing_key) if routing_key else None
    g.ScoreRequestStart(b)
    g.ScoreRequestAddModel(b, m)
    g.ScoreRequestAddVersion(b, version)
    if lab is not None:
        g.ScoreRequestAddLabel(b, lab)
    if key is not None:
        g.ScoreRequestAddRoutingKey(b, key)
    g.ScoreRequestAddDeadlineUs(b, deadline_us)
    g.ScoreRequestAddNumItems(b, num_items)
    g.ScoreRequestAddUser(b, user_vec)
    g.ScoreRequestAddItems(b, items_vec)
    b.Finish(g.ScoreRequestEnd(b))
    return bytes(b.Output())


def encode_status_request(model=""):
    b = flatbuffers.Builder(64)
    m = b.CreateString(model)
    g.StatusRequestStart(b)
    g.StatusRequestAddModel(b, m)
    b.Finish(g.StatusRequestEnd(b))
    return bytes(b.Output())


def _floats(t, as_numpy):
    """A table's `scores` vector: a list of float, or a numpy array."""
    if as_numpy:
        scores = t.ScoresAsNumpy()
        if isinstance(scores, int):  # no scores vector
            import numpy as np

            scores = np.zeros(0, dtype=np.float32)
        return scores
    return [t.Scores(i) for i in range(t.ScoresLength())]


def decode_score_response(body, as_numpy=False):
    """(model, version, scores, heads) of a ScoreResponse body: `heads` maps a multi-task
    model's head names, the default head first, to their scores (empty for a single-task
    model)."""
    r = g.ScoreResponse.GetRootAs(body, 0)
    scores = _floats(r, as_numpy)
    heads = {}
    first = r.Head()
    if first is not None:
        heads[first.decode()] = scores
        for i in range(r.HeadsLength()):
            h = r.Heads(i)
            heads[h.Name().decode()] = _floats(h, as_numpy)
    model = r.Model()
    return (model.decode() if model else ""), r.Version(), scores, heads


def decode_error(body):
    """(code, message) of an ErrorResponse body."""
    e = g.ErrorResponse.GetRootAs(body, 0)
    msg = e.Message()
    return e.Code(), (msg.decode() if msg else "")


def decode_status(body):
    """The StatusResponse as plain dicts."""
    s = g.StatusResponse.GetRootAs(body, 0)
    out = []
    for i in range(s.ModelsLength()):
        m = s.Models(i)
        versions = []
        for j in range(m.VersionsLength()):
            v = m.Versions(j)
            versions.append({
                "version": v.Version(),
                "state": (v.State() or b"").decode(),
                "mapped_bytes": v.MappedBytes(),
                "kind": (v.Kind() or b"").decode(),
                "features": [{
                    "name": v.Features(k).Name().decode(),
                    "type": (v.Features(k).Type() or b"").decode(),
                    "kind": v.Features(k).Kind(),
                } for k in range(v.FeaturesLength())],
                # A multi-task version's heads, the default first; [] for a single-task one.
                "heads": [v.Heads(k).decode() for k in range(v.HeadsLength())],
            })
        labels = [{"name": m.Labels(j).Name().decode(), "version": m.Labels(j).Version(),
                   "weight": m.Labels(j).Weight()} for j in range(m.LabelsLength())]
        out.append({"name": m.Name().decode(), "versions": versions, "labels": labels,
                    "default_version": m.DefaultVersion()})
    return out
