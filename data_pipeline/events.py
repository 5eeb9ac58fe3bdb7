"""Event-camera files -> event arrays -> [T, 2, H, W] count frames.

Events are a structured array of `EVENT_DTYPE`: t (int64, microseconds), x and y (uint16,
pixels, x along the width), p (uint8, 1 = ON / brighter, 0 = OFF), in file order. Readers
return `(events, (H, W))`. Formats, chosen by suffix:

- `.aedat`: jAER AEDAT 2.0 from a DVS128, the format of the original CIFAR10-DVS. Decoded as
  SpikingJelly's and tonic's CIFAR10-DVS readers do, so frames match what the reference trained on.
- `.aedat4`: iniVation AEDAT 4 (the `.aedat4` conversion of CIFAR10-DVS, DAVIS recordings),
  decoded by the `aedat` package; coordinates as stored, as tonic reads them.

The writers exist so tests can produce files in these exact binary layouts.
"""

import struct
from pathlib import Path

import aedat
import numpy as np

from . import DataError

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
DVS128_SIZE = (128, 128)
EVENT_SUFFIXES = (".aedat", ".aedat4")

_AEDAT2_VERSION = b"#!AER-DAT2.0"
_AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"
# AEDAT 4 event struct {int64 t; int16 x; int16 y; bool on} padded to 8-byte alignment.
_AEDAT4_EVENT = np.dtype({"names": ["t", "x", "y", "on"], "formats": ["<i8", "<i2", "<i2", "u1"],
                          "offsets": [0, 8, 10, 12], "itemsize": 16})
_AEDAT4_PACKET_EVENTS = 4096  # events per packet; real recorders also split streams into packets


def read_events(path) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an event file; returns (events of EVENT_DTYPE, sensor (H, W)). DataError if unreadable."""
    path = Path(path)
    if path.suffix not in EVENT_SUFFIXES:
        raise DataError(f"{path}: unknown event file type {path.suffix!r} "
                        f"(expected one of {', '.join(EVENT_SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: no such event file")
    if path.suffix == ".aedat":
        return _read_aedat2(path), DVS128_SIZE
    return _read_aedat4(path)


def _read_aedat2(path: Path) -> np.ndarray:
    """jAER AEDAT 2.0: '#' header lines, then big-endian (uint32 address, uint32 timestamp us).

    Timestamps are kept as stored: they wrap after 71 minutes, far beyond a CIFAR10-DVS clip.
    """
    data = path.read_bytes()
    pos = 0
    while data.startswith(b"#", pos):
        end = data.find(b"\n", pos)
        if end < 0:
            raise DataError(f"{path}: truncated AEDAT 2.0 header")
        line = data[pos:end].rstrip(b"\r")
        if line.startswith(b"#!AER-DAT") and line != _AEDAT2_VERSION:
            raise DataError(f"{path}: unsupported jAER format {line[2:].decode(errors='replace')} "
                            f"(only AEDAT 2.0 is read)")
        pos = end + 1
    body = memoryview(data)[pos:]
    if len(body) % 8:
        raise DataError(f"{path}: truncated AEDAT 2.0 file ({len(body)} bytes of events "
                        f"is not a whole number of 8-byte events)")
    raw = np.frombuffer(body, dtype=">u4").reshape(-1, 2)
    addr = raw[:, 0]
    # DVS128 address: bit 0 polarity (1 = OFF), bits 1-7 column, bits 8-14 row. SpikingJelly
    # and tonic transpose and mirror both axes for CIFAR10-DVS (jackd/events-tfds#1).
    x_raw = (addr >> 1) & 0x7F
    y_raw = (addr >> 8) & 0x7F
    events = np.empty(len(raw), dtype=EVENT_DTYPE)
    events["t"] = raw[:, 1]
    events["x"] = 127 - y_raw
    events["y"] = 127 - x_raw
    events["p"] = 1 - (addr & 1)
    return events


def _read_aedat4(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """AEDAT 4 via `aedat`: the first events stream, its packets concatenated."""
    try:
        decoder = aedat.Decoder(str(path))
        streams = {sid: s for sid, s in decoder.id_to_stream().items() if s["type"] == "events"}
        if not streams:
            raise DataError(f"{path}: AEDAT4 file has no events stream")
        sid = min(streams)
        chunks = [packet["events"] for packet in decoder
                  if packet["stream_id"] == sid and "events" in packet]
    except RuntimeError as error:  # the decoder's only error type: bad magic, truncation, ...
        raise DataError(f"{path}: cannot decode AEDAT4 ({error})") from None
    sensor_size = (streams[sid]["height"], streams[sid]["width"])
    if not chunks:
        return np.empty(0, dtype=EVENT_DTYPE), sensor_size
    raw = np.concatenate(chunks)
    events = np.empty(len(raw), dtype=EVENT_DTYPE)
    events["t"] = raw["t"]
    events["x"] = raw["x"]
    events["y"] = raw["y"]
    events["p"] = raw["on"]
    return events, sensor_size


def write_aedat2(path, events: np.ndarray) -> None:
    """Write DVS128 events as jAER AEDAT 2.0, the exact inverse of the `.aedat` reader."""
    if len(events) and (events["x"].max() > 127 or events["y"].max() > 127):
        raise ValueError("AEDAT 2.0 (DVS128) holds coordinates 0..127 only")
    if len(events) and (events["t"].min() < 0 or events["t"].max() >= 2**32):
        raise ValueError("AEDAT 2.0 timestamps are uint32 microseconds")
    x_raw = 127 - events["y"].astype(np.uint32)
    y_raw = 127 - events["x"].astype(np.uint32)
    raw = np.empty((len(events), 2), dtype=">u4")
    raw[:, 0] = (y_raw << 8) | (x_raw << 1) | (1 - events["p"].astype(np.uint32))
    raw[:, 1] = events["t"]
    header = (_AEDAT2_VERSION + b"\r\n"
              b"# This is a raw AE data file - do not edit\r\n"
              b"# Data format is int32 address, int32 timestamp (8 bytes total), "
              b"repeated for each event\r\n"
              b"# Timestamps tick is 1 us\r\n"
              b"# AEChip: ch.unizh.ini.jaer.chip.retina.DVS128\r\n")
    Path(path).write_bytes(header + raw.tobytes())


def write_aedat4(path, events: np.ndarray, sensor_size: tuple[int, int]) -> None:
    """Write events as an uncompressed AEDAT 4 file (one events stream) that `aedat` decodes."""
    height, width = sensor_size
    description = (
        '<dv version="2.0">\n'
        '    <node name="outInfo" path="/mainloop/Recorder/outInfo/">\n'
        '        <node name="0" path="/mainloop/Recorder/outInfo/0/">\n'
        '            <attr key="compression" type="string">NONE</attr>\n'
        '            <attr key="typeIdentifier" type="string">EVTS</attr>\n'
        '            <node name="info" path="/mainloop/Recorder/outInfo/0/info/">\n'
        f'                <attr key="sizeX" type="int">{width}</attr>\n'
        f'                <attr key="sizeY" type="int">{height}</attr>\n'
        '            </node>\n'
        '        </node>\n'
        '    </node>\n'
        '</dv>\n').encode()
    parts = [_AEDAT4_MAGIC, _flatbuffer_ioheader(description)]
    for start in range(0, len(events), _AEDAT4_PACKET_EVENTS):
        packet = _flatbuffer_event_packet(events[start:start + _AEDAT4_PACKET_EVENTS])
        parts.append(struct.pack("<iI", 0, len(packet)) + packet)
    Path(path).write_bytes(b"".join(parts))


def _flatbuffer_ioheader(description: bytes) -> bytes:
    """Size-prefixed `Ioheader` table holding only `description` (compression None, no data table)."""
    # [root uoffset][id][vtable: 10 bytes][pad][table: soffset, uoffset][string]; offsets from 0
    string = struct.pack("<I", len(description)) + description + b"\0"
    body = (struct.pack("<I", 20) + b"IOHE"
            + struct.pack("<HHHHH", 10, 8, 0, 0, 4) + b"\0\0"
            + struct.pack("<iI", 20 - 8, 4) + string)
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<I", len(body)) + body


def _flatbuffer_event_packet(events: np.ndarray) -> bytes:
    """Size-prefixed `EventPacket` table whose `elements` vector holds the 16-byte Event structs."""
    elements = np.zeros(len(events), dtype=_AEDAT4_EVENT)
    elements["t"] = events["t"]
    elements["x"] = events["x"]
    elements["y"] = events["y"]
    elements["on"] = events["p"]
    # [size][root][id][vtable: 6 bytes][pad][table: soffset, uoffset][count][structs at 32]
    head = (struct.pack("<I", 20 - 4) + b"EVTS"
            + struct.pack("<HHH", 6, 8, 4) + b"\0\0"
            + struct.pack("<iII", 20 - 12, 4, len(events)))
    payload = head + elements.tobytes()
    return struct.pack("<I", len(payload)) + payload


def events_to_frames(events: np.ndarray, T: int, sensor_size: tuple[int, int],
                     split_by: str = "number") -> np.ndarray:
    """Integrate events into T frames of per-polarity counts: float32 [T, 2, H, W].

    Channel 0 counts OFF events, channel 1 ON events (SpikingJelly's order). split_by="number"
    gives each frame N // T events in file order and the last frame the remainder;
    split_by="time" cuts [t0, t_last] into T windows of (t_last - t0) // T microseconds, the
    last one open-ended. Both are SpikingJelly's `integrate_events_by_fixed_frames_number`.
    Every event lands in exactly one frame, so per-polarity totals are conserved.
    """
    height, width = sensor_size
    n = len(events)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if n and (events["x"].max() >= width or events["y"].max() >= height):
        raise ValueError(f"event coordinates (max x {events['x'].max()}, max y "
                         f"{events['y'].max()}) outside the {width}x{height} sensor")
    if n and events["p"].max() > 1:
        raise ValueError("polarity must be 0 or 1")
    if split_by == "number":
        per_frame = n // T
        frame = (np.minimum(np.arange(n) // per_frame, T - 1) if per_frame
                 else np.full(n, T - 1))
    elif split_by == "time":
        t = events["t"]
        window = (t[-1] - t[0]) // T if n else 0
        if n and window == 0:
            raise ValueError(f"events span {t[-1] - t[0]} us, too short to split into {T} "
                             f"time windows")
        frame = np.clip((t - t[0]) // window, 0, T - 1) if n else np.zeros(0, dtype=np.int64)
    else:
        raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
    index = ((frame * 2 + events["p"]) * height + events["y"]) * width + events["x"]
    counts = np.bincount(index.astype(np.int64), minlength=T * 2 * height * width)
    return counts.reshape(T, 2, height, width).astype(np.float32)
