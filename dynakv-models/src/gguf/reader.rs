//! Parsing of the GGUF header, metadata and tensor descriptions.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use super::dequant::dequantize;
use super::types::{GgmlType, MetaValue};
use crate::error::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml never has more than 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal but never deep in practice.
const MAX_ARRAY_DEPTH: usize = 4;

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A tensor's bytes inside the mapped file, shared: weights kept in their
/// block formats point into the map instead of copying it, so a loaded
/// model holds the file once.
#[derive(Clone)]
pub struct TensorBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
    /// The map is a file's (its pages can be given back and read again),
    /// not an anonymous copy.
    file_backed: bool,
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({} bytes at {})", self.len, self.start)
    }
}

impl TensorBytes {
    /// Bytes held in memory (copied into an anonymous map): block data that
    /// does not come from a GGUF file, and tests.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        Ok(Self {
            map: Arc::new(map_copy(bytes)?),
            start: 0,
            len: bytes.len(),
            file_backed: false,
        })
    }

    /// Gives this process's resident pages of these bytes back to the
    /// operating system; the next read faults them in again from the file.
    /// Returns whether it did (bytes held in memory are left alone: their
    /// pages have no file to come back from).
    ///
    /// Why: on AVX-512 VNNI CPUs every product reads a tiled copy of its matrix
    /// made at load, and reading the rows to make it left the file's pages
    /// resident for nothing: the process held the weights twice. Only whole
    /// pages inside these bytes are given back, so a neighbour's are not.
    pub fn release_pages(&self) -> bool {
        self.release_range(0, self.len)
    }

    /// [`TensorBytes::release_pages`] for bytes `offset .. offset + len` of
    /// these bytes only (clipped to them): a large matrix's rows can be
    /// given back while its copy is made, so the process never holds both
    /// whole.
    pub fn release_range(&self, offset: usize, len: usize) -> bool {
        if !self.file_backed || offset >= self.len {
            return false;
        }
        let len = len.min(self.len - offset);
        // 4 KiB pages; where pages are larger the range is misaligned,
        // madvise refuses it and the pages simply stay
        let page = 4096;
        let first = (self.start + offset).div_ceil(page) * page;
        let end = (self.start + offset + len) / page * page;
        if end <= first {
            return false;
        }
        // SAFETY: a read-only shared map of a regular file, never written
        // through: MADV_DONTNEED only drops this process's page-table
        // entries, and the next access reads the same file contents back,
        // so no reference into the map sees a value change (a file changed
        // underneath would break the map itself, the contract of
        // `GgufFile::open`). The range lies inside the map and is
        // page-aligned (the map starts on a page).
        #[cfg(unix)]
        {
            unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first,
                    end - first,
                )
            }
            .is_ok()
        }
        #[cfg(not(unix))]
        false
    }
}

/// A read-only anonymous map holding a copy of `bytes` (at least one byte
/// long: a zero-length map is an error on some systems).
fn map_copy(bytes: &[u8]) -> Result<Mmap, ModelError> {
    let io = |e| ModelError::Io {
        path: "(memory)".into(),
        source: e,
    };
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
    map[..bytes.len()].copy_from_slice(bytes);
    map.make_read_only().map_err(io)
}

impl std::ops::Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // in bounds: made only from a TensorInfo checked at parse time
        self.map
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    mmap: Arc<Mmap>,
    /// `mmap` maps a file (not a copy held in memory).
    file_backed: bool,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    /// Metadata keys in file order (for listing).
    pub metadata_keys: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if n > self.remaining() {
            return Err(ModelError::Gguf(format!(
                "truncated file: {what} needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ModelError> {
        Ok(self.take(1, what)?[0])
    }
    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut out = [0u8; N];
        for (o, b) in out.iter_mut().zip(self.take(N, what)?) {
            *o = *b;
        }
        Ok(out)
    }
    fn u16(&mut self, what: &str) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, version: u32, min_size: usize, what: &str) -> Result<usize, ModelError> {
        let n = if version == 1 {
            self.u32(what)? as u64
        } else {
            self.u64(what)?
        };
        let fits = n
            .checked_mul(min_size as u64)
            .is_some_and(|b| b <= self.remaining() as u64);
        if !fits {
            return Err(ModelError::Gguf(format!(
                "{what} {n} does not fit in the {} bytes left in the file (a damaged file?)",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, version: u32, what: &str) -> Result<String, ModelError> {
        let n = self.count(version, 1, &format!("{what}: a string length of"))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ModelError::Gguf(format!("{what} is not valid UTF-8")))
    }

    fn value(
        &mut self,
        version: u32,
        type_id: u32,
        key: &str,
        depth: usize,
    ) -> Result<MetaValue, ModelError> {
        let v = match type_id {
            0 => MetaValue::U8(self.u8(key)?),
            1 => MetaValue::I8(self.u8(key)? as i8),
            2 => MetaValue::U16(self.u16(key)?),
            3 => MetaValue::I16(self.u16(key)? as i16),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(self.u32(key)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(ModelError::Gguf(format!(
                        "metadata `{key}`: invalid bool byte {b}"
                    )))
                }
            },
            8 => MetaValue::String(self.string(version, &format!("metadata `{key}`"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(ModelError::Gguf(format!(
                        "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(key)?;
                let min = min_value_size(elem).ok_or_else(|| {
                    ModelError::Gguf(format!(
                        "metadata `{key}`: unknown array element type {elem}"
                    ))
                })?;
                let n = self.count(
                    version,
                    min,
                    &format!("metadata `{key}`: an array length of"),
                )?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(version, elem, &format!("{key}[{i}]"), depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(self.u64(key)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(key)?)),
            t => {
                return Err(ModelError::Gguf(format!(
                    "metadata `{key}`: unknown value type {t}"
                )))
            }
        };
        Ok(v)
    }
}

/// Smallest encoded size of a value of a type, used to bound array counts.
fn min_value_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 4, // at least a length prefix
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        // a FIFO or a device would block or never end: only regular files
        let meta = std::fs::metadata(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if !meta.is_file() {
            return Err(ModelError::Gguf(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        let file = File::open(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        // SAFETY: the map is read-only; a file truncated by another process while
        // mapped would fault, which is the usual contract of model loaders.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::parse(mmap, true)
    }

    /// Parses a GGUF file held in memory (copied into an anonymous map):
    /// for tests and fuzz targets that build or damage files on the fly.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.is_empty() {
            return Err(ModelError::Gguf("an empty file".into()));
        }
        Self::parse(map_copy(bytes)?, false)
    }

    fn parse(mmap: Mmap, file_backed: bool) -> Result<Self, ModelError> {
        let (version, metadata, metadata_keys, tensors) = parse_header(&mmap)?;
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            mmap: Arc::new(mmap),
            file_backed,
            version,
            metadata,
            metadata_keys,
            tensors,
            tensor_index,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer, or an error naming the key.
    pub fn meta_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.meta(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
            .as_u64()
            .ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is not an unsigned integer")))
    }

    /// A required float, or an error naming the key.
    pub fn meta_f64(&self, key: &str) -> Result<f64, ModelError> {
        self.meta(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
            .as_f64()
            .ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is not a number")))
    }

    /// A required string, or an error naming the key.
    pub fn meta_str(&self, key: &str) -> Result<&str, ModelError> {
        self.meta(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
            .as_str()
            .ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is not a string")))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.n_bytes) as usize]
    }

    /// The raw bytes of a tensor, sharing the map (no copy).
    pub fn tensor_shared(&self, info: &TensorInfo) -> TensorBytes {
        TensorBytes {
            map: self.mmap.clone(),
            start: info.offset as usize,
            len: info.n_bytes as usize,
            file_backed: self.file_backed,
        }
    }

    /// Dequantises a tensor to f32 in ggml order (`dims[0]` fastest); a
    /// value that is not finite (a damaged block scale) is an error naming
    /// the tensor and the element.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<u64>), ModelError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let data = dequantize(
            info.ggml_type,
            self.tensor_bytes(info),
            info.n_elements() as usize,
        )
        .map_err(|e| ModelError::Gguf(format!("tensor `{name}`: {e}")))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::Gguf(format!(
                "tensor `{name}`: element {i} is {} (a damaged block?)",
                data[i]
            )));
        }
        Ok((data, info.dims.clone()))
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}

type Header = (
    u32,
    HashMap<String, MetaValue>,
    Vec<String>,
    Vec<TensorInfo>,
);

/// Parses everything before the tensor data; exposed for tests on byte buffers.
pub(crate) fn parse_header(buf: &[u8]) -> Result<Header, ModelError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != MAGIC {
        return Err(ModelError::Gguf(format!(
            "not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = c.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(ModelError::Gguf(format!(
            "unsupported GGUF version {version} (supported: 1, 2, 3)"
        )));
    }
    // A tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let n_tensors = c.count(version, 24, "tensor_count")?;
    // A key-value pair is at least 8 (key len) + 4 (type) + 1 bytes.
    let n_kv = c.count(version, 13, "metadata_kv_count")?;

    let mut metadata = HashMap::with_capacity(n_kv);
    let mut keys = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(version, &format!("metadata key #{i}"))?;
        let t = c.u32(&key)?;
        let v = c.value(version, t, &key, 0)?;
        keys.push(key.clone());
        metadata.insert(key, v);
    }

    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(ModelError::Gguf(format!(
                    "metadata `general.alignment` = {v:?} is not a power of two"
                )))
            }
        },
    };

    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(version, &format!("tensor #{i} name"))?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(ModelError::Gguf(format!(
                "tensor `{name}`: n_dims = {n_dims} (must be 1..={MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(if version == 1 {
                c.u32(&name)? as u64
            } else {
                c.u64(&name)?
            });
        }
        let type_id = c.u32(&name)?;
        let ggml_type = GgmlType::from_id(type_id, &name)?;
        let rel_offset = c.u64(&name)?;
        raw.push((name, dims, ggml_type, rel_offset));
    }

    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(n_tensors);
    for (name, dims, ggml_type, rel_offset) in raw {
        let n = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ModelError::Gguf(format!("tensor `{name}`: element count overflows")))?;
        let n_bytes = ggml_type.bytes_for(n).ok_or_else(|| {
            ModelError::Gguf(format!(
                "tensor `{name}`: {n} elements is not a whole number of {ggml_type:?} blocks"
            ))
        })?;
        if rel_offset % alignment != 0 {
            return Err(ModelError::Gguf(format!(
                "tensor `{name}`: offset {rel_offset} is not aligned to {alignment}"
            )));
        }
        let offset = data_start
            .checked_add(rel_offset)
            .filter(|o| o.checked_add(n_bytes).is_some_and(|end| end <= file_len))
            .ok_or_else(|| {
                ModelError::Gguf(format!(
                    "tensor `{name}`: data ({n_bytes} bytes at offset {rel_offset}) runs past the end of the file ({file_len} bytes)"
                ))
            })?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        });
    }
    Ok((version, metadata, keys, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small valid GGUF v3 file in memory.
    fn tiny_file() -> Vec<u8> {
        tiny_file_with_type(0)
    }

    /// The same file with the tensor's type id replaced.
    fn tiny_file_with_type(type_id: u32) -> Vec<u8> {
        file_of(type_id, &[1.0, 2.0, 3.0, 4.0])
    }

    /// A file of one tensor `w` holding `values` under type id `type_id`.
    fn file_of(type_id: u32, values: &[f32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&3u64.to_le_bytes()); // kv
        let key = |b: &mut Vec<u8>, k: &str| {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
        };
        key(&mut b, "a.u32");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        key(&mut b, "a.arr");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        key(&mut b, "x");
        key(&mut b, "yz");
        key(&mut b, "a.f64");
        b.extend_from_slice(&12u32.to_le_bytes());
        b.extend_from_slice(&1.5f64.to_le_bytes());
        key(&mut b, "w");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(values.len() as u64).to_le_bytes());
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for v in values {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// A valid file damaged ([`dynakv_core::fuzz`]): the parser returns,
    /// never panics or allocates what the file cannot hold. CI runs 20,000
    /// fixed inputs; the random target below runs long (docs/architecture.md).
    #[test]
    fn fuzz_header_parser_fixed_inputs() {
        for b in dynakv_core::fuzz::seeded(&tiny_file(), 20_000, 0x6767_7566) {
            let _ = parse_header(&b);
        }
    }

    #[test]
    #[ignore = "random fuzzing: BOLERO_RANDOM_ITERATIONS=N cargo test --release -- --ignored fuzz_"]
    fn fuzz_header_parser() {
        let seed = tiny_file();
        bolero::check!()
            .with_type::<(Vec<(u16, u8)>, Vec<(u16, u64)>, Option<u16>)>()
            .for_each(|(bytes, words, cut)| {
                let _ = parse_header(&dynakv_core::fuzz::mutate(&seed, bytes, words, *cut));
            });
    }

    #[test]
    fn parses_a_valid_file() {
        let buf = tiny_file();
        let (version, meta, keys, tensors) = parse_header(&buf).unwrap();
        assert_eq!(version, 3);
        assert_eq!(keys, vec!["a.u32", "a.arr", "a.f64"]);
        assert_eq!(meta["a.u32"], MetaValue::U32(7));
        assert_eq!(meta["a.f64"].as_f64(), Some(1.5));
        assert_eq!(
            meta["a.arr"],
            MetaValue::Array(vec![
                MetaValue::String("x".into()),
                MetaValue::String("yz".into())
            ])
        );
        assert_eq!(tensors[0].name, "w");
        assert_eq!(tensors[0].n_bytes, 16);
        assert_eq!(tensors[0].offset as usize, buf.len() - 16);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let buf = tiny_file();
        for cut in 0..buf.len() {
            assert!(parse_header(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn absurd_counts_are_rejected_before_allocating() {
        let mut buf = tiny_file();
        buf[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_header(&buf).unwrap_err().to_string();
        assert!(err.contains("tensor_count"), "{err}");
        let mut buf = tiny_file();
        buf[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = parse_header(&buf).unwrap_err().to_string();
        assert!(err.contains("metadata_kv_count"), "{err}");
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let mut buf = tiny_file();
        buf[0] = b'X';
        assert!(parse_header(&buf)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut buf = tiny_file();
        buf[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(parse_header(&buf)
            .unwrap_err()
            .to_string()
            .contains("version"));
    }

    #[test]
    fn unsupported_type_names_the_tensor() {
        let buf = tiny_file_with_type(99);
        let err = parse_header(&buf).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("99"), "{err}");
    }

    #[test]
    #[cfg(unix)]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("dynakv-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("model.gguf");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = GgufFile::open(&fifo).err().unwrap().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let err = GgufFile::open(&dir).err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tensor_value_that_is_not_finite_is_named() {
        let mut buf = tiny_file();
        let n = buf.len();
        buf[n - 8..n - 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let path = std::env::temp_dir().join(format!("dynakv-nan-{}.gguf", std::process::id()));
        std::fs::write(&path, &buf).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let err = gguf.tensor_f32("w").unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("`w`") && err.contains("element 2"), "{err}");
    }

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        // 20 KB of f32: whole pages inside the tensor
        let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5).collect();
        let path = std::env::temp_dir().join(format!("dynakv-pages-{}.gguf", std::process::id()));
        std::fs::write(&path, file_of(0, &values)).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let bytes = gguf.tensor_shared(gguf.tensor("w").unwrap());
        let before = bytes.to_vec();
        // a stretch with a whole page inside, then one too short for any,
        // then one past the end
        assert_eq!(bytes.release_range(3000, 9000), cfg!(unix));
        assert!(!bytes.release_range(100, 200));
        assert!(!bytes.release_range(20_000, 10));
        assert_eq!(&bytes[..], &before[..]);
        assert_eq!(bytes.release_pages(), cfg!(unix));
        assert_eq!(&bytes[..], &before[..]);
        std::fs::remove_file(&path).unwrap();
        // a copy held in memory keeps its pages (they have no file)
        let held = TensorBytes::from_bytes(&before).unwrap();
        assert!(!held.release_pages());
        assert_eq!(&held[..], &before[..]);
    }

    #[test]
    fn tensor_past_the_end_is_an_error() {
        let buf = tiny_file();
        let short = &buf[..buf.len() - 4];
        let err = parse_header(short).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("past the end"), "{err}");
    }
}
