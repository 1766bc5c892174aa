//! Writing a state dict as a PyTorch `.pth` file that `torch.load` reads (also with
//! `weights_only=True`): the zip layout `torch.save` produces (`archive/data.pkl`, one
//! `archive/data/<n>` record per tensor, `archive/version`), with a protocol-2 pickle of
//! `{"model": OrderedDict(name -> tensor)}`, the shape of the official SimMIM checkpoints.
//! Only the few pickle opcodes and the stored (uncompressed) zip entries this needs.

use std::io::Write;

use simmim_model::weights::{HostTensor, StateDict};

/// The `.pth` bytes for `state` under the top-level key `model`.
pub fn pth_bytes(state: &StateDict) -> Vec<u8> {
    let mut pickle = Pickle::default();
    pickle.op(&[0x80, 2]); // PROTO 2
    pickle.op(b"}"); // EMPTY_DICT
    pickle.unicode("model");
    pickle.global("collections", "OrderedDict");
    pickle.op(b")"); // EMPTY_TUPLE
    pickle.op(b"R"); // REDUCE
    pickle.op(b"("); // MARK
    let mut records = Vec::new();
    for (index, (name, tensor)) in state.iter().enumerate() {
        let (storage, data, numel) = match tensor {
            HostTensor::F32 { values, .. } => (
                "FloatStorage",
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
                values.len(),
            ),
            HostTensor::I64 { values, .. } => (
                "LongStorage",
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
                values.len(),
            ),
        };
        let key = index.to_string();
        let shape = tensor.shape();
        let mut strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        pickle.unicode(name);
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.op(b"("); // MARK: the arguments
        pickle.op(b"("); // MARK: the persistent id
        pickle.unicode("storage");
        pickle.global("torch", storage);
        pickle.unicode(&key);
        pickle.unicode("cpu");
        pickle.int(numel);
        pickle.op(b"t"); // TUPLE
        pickle.op(b"Q"); // BINPERSID
        pickle.int(0); // storage offset
        pickle.tuple(shape);
        pickle.tuple(&strides);
        pickle.op(&[0x89]); // NEWFALSE: requires_grad
        pickle.global("collections", "OrderedDict");
        pickle.op(b")");
        pickle.op(b"R"); // backward hooks: an empty OrderedDict
        pickle.op(b"t");
        pickle.op(b"R");
        records.push((format!("archive/data/{key}"), data));
    }
    pickle.op(b"u"); // SETITEMS
    pickle.op(b"s"); // SETITEM model
    pickle.op(b"."); // STOP

    let mut zip = StoredZip::default();
    zip.add("archive/data.pkl", &pickle.bytes);
    zip.add("archive/byteorder", b"little");
    for (name, data) in &records {
        zip.add(name, data);
    }
    zip.add("archive/version", b"3\n");
    zip.finish()
}

#[derive(Default)]
struct Pickle {
    bytes: Vec<u8>,
}

impl Pickle {
    fn op(&mut self, op: &[u8]) {
        self.bytes.extend_from_slice(op);
    }
    fn unicode(&mut self, s: &str) {
        self.bytes.push(b'X'); // BINUNICODE
        self.bytes
            .extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.bytes.push(b'c');
        self.bytes.extend_from_slice(module.as_bytes());
        self.bytes.push(b'\n');
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(b'\n');
    }
    fn int(&mut self, v: usize) {
        if let Ok(small) = i32::try_from(v) {
            self.bytes.push(b'J'); // BININT
            self.bytes.extend_from_slice(&small.to_le_bytes());
        } else {
            self.bytes.push(0x8a); // LONG1
            self.bytes.push(8);
            self.bytes.extend_from_slice(&(v as i64).to_le_bytes());
        }
    }
    fn tuple(&mut self, values: &[usize]) {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t");
    }
}

/// A zip archive of stored (uncompressed) entries, each aligned to 64 bytes as `torch.save`
/// aligns them (so `torch.load(mmap=True)` works too).
#[derive(Default)]
struct StoredZip {
    out: Vec<u8>,
    central: Vec<u8>,
    entries: u16,
}

impl StoredZip {
    fn add(&mut self, name: &str, data: &[u8]) {
        let offset = self.out.len() as u32;
        let crc = crc32fast::hash(data);
        // Pad the local header's extra field so the data starts on a 64-byte boundary.
        let header_len = 30 + name.len();
        let pad = (64 - (self.out.len() + header_len + 4) % 64) % 64;
        let extra_len = 4 + pad;
        let w = &mut self.out;
        w.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        w.extend_from_slice(&20u16.to_le_bytes()); // version needed
        w.extend_from_slice(&0u16.to_le_bytes()); // flags
        w.extend_from_slice(&0u16.to_le_bytes()); // stored
        w.extend_from_slice(&0u16.to_le_bytes()); // time
        w.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
        w.extend_from_slice(&crc.to_le_bytes());
        w.extend_from_slice(&(data.len() as u32).to_le_bytes());
        w.extend_from_slice(&(data.len() as u32).to_le_bytes());
        w.extend_from_slice(&(name.len() as u16).to_le_bytes());
        w.extend_from_slice(&(extra_len as u16).to_le_bytes());
        w.extend_from_slice(name.as_bytes());
        w.extend_from_slice(&0xFB5Au16.to_le_bytes()); // padding extra field id (as torch)
        w.extend_from_slice(&(pad as u16).to_le_bytes());
        w.extend(std::iter::repeat_n(b'Z', pad));
        w.extend_from_slice(data);

        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes()); // made by
        c.extend_from_slice(&20u16.to_le_bytes()); // needed
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0x21u16.to_le_bytes());
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // extra
        c.extend_from_slice(&0u16.to_le_bytes()); // comment
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.entries += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        let central_at = self.out.len() as u32;
        let central_len = self.central.len() as u32;
        self.out.extend_from_slice(&self.central);
        let mut end = Vec::new();
        end.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&self.entries.to_le_bytes());
        end.extend_from_slice(&self.entries.to_le_bytes());
        end.extend_from_slice(&central_len.to_le_bytes());
        end.extend_from_slice(&central_at.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        let _ = self.out.write_all(&end);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file reads back through the model crate's PyTorch reader (burn-store's `.pth`
    /// support), names, shapes, types and values intact.
    #[test]
    fn pth_round_trips_through_a_pytorch_reader() {
        let mut state = StateDict::new();
        state.insert(
            "encoder.layers.0.blocks.0.attn.qkv.weight".into(),
            HostTensor::F32 {
                shape: vec![3, 2],
                values: vec![1.0, -2.0, 3.5, 4.0, 5.0, 6.25],
            },
        );
        state.insert(
            "encoder.layers.0.blocks.0.attn.relative_position_index".into(),
            HostTensor::I64 {
                shape: vec![2, 2],
                values: vec![0, 1, 2, 3],
            },
        );
        state.insert(
            "decoder.0.bias".into(),
            HostTensor::F32 {
                shape: vec![4],
                values: vec![0.5; 4],
            },
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.pth");
        std::fs::write(&path, pth_bytes(&state)).expect("write");
        let read = simmim_model::weights::read_state_dict(&path).expect("read .pth");
        assert_eq!(read, state);
    }
}
