#!/usr/bin/env python3
"""Reads an isp export's weights.pt with the Python standard library only, following the protocol torch.load
implements for the zip format (archive/data.pkl + archive/data/<key>), and prints every tensor as JSON:
{"name": {"dtype": ..., "shape": [...], "values": [...]}}.

For people without PyTorch, and for the test that checks the file is what torch.load expects. With PyTorch,
simply: state = torch.load("weights.pt"); model.load_state_dict(state).
"""
import array
import json
import pickle
import sys
import zipfile

# torch storage class -> (array typecode, dtype name)
STORAGES = {
    "FloatStorage": ("f", "float32"), "DoubleStorage": ("d", "float64"), "LongStorage": ("q", "int64"),
    "IntStorage": ("i", "int32"), "ShortStorage": ("h", "int16"), "CharStorage": ("b", "int8"),
    "ByteStorage": ("B", "uint8"), "BoolStorage": ("B", "bool"),
}


class Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, list(shape), list(stride)

    def values(self):
        data, out = self.storage["data"], []
        def walk(dim, pos):
            if dim == len(self.shape):
                out.append(data[pos])
                return
            for i in range(self.shape[dim]):
                walk(dim + 1, pos + i * self.stride[dim])
        walk(0, self.offset)
        return out


def load(path):
    z = zipfile.ZipFile(path)
    pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    prefix = pkl[: -len("data.pkl")]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, shape, stride, *rest: Tensor(storage, offset, shape, stride)
            if module == "torch" and name in STORAGES:
                return name
            if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
                return lambda obj, tag: obj
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            kind, storage_type, key, _location, _numel = pid
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
            code, dtype = STORAGES[storage_type]
            data = array.array(code)
            data.frombytes(z.read(prefix + "data/" + str(key)))
            if sys.byteorder != "little":
                data.byteswap()
            return {"data": data, "dtype": dtype}

    return Unpickler(z.open(pkl)).load()


def main():
    state = load(sys.argv[1])
    out = {k: {"dtype": t.storage["dtype"], "shape": t.shape, "values": t.values()} for k, t in state.items()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
