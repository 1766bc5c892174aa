//! TFRecord framing, the container of TensorBoard event files: each record is its length
//! (u64 LE), a masked CRC32C of the length, the data and a masked CRC32C of the data.
//! TensorBoard's reader stops at the first bad CRC without an error, so a damaged file
//! silently loses everything after the damage; [`read_records`] says where instead.

/// TFRecord's "masked" CRC: rotated and offset so a CRC of data holding CRCs stays strong.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one record holding `data` to `out`.
pub fn append_record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("record at byte {offset} is cut short ({have} of {need} bytes)")]
    Truncated {
        offset: usize,
        have: usize,
        need: usize,
    },
    #[error("record at byte {offset}: the length's checksum does not match")]
    LengthChecksum { offset: usize },
    #[error("record at byte {offset}: the data's checksum does not match")]
    DataChecksum { offset: usize },
}

impl RecordError {
    /// Where the damaged record starts: everything before it is intact.
    pub fn offset(&self) -> usize {
        match self {
            RecordError::Truncated { offset, .. }
            | RecordError::LengthChecksum { offset }
            | RecordError::DataChecksum { offset } => *offset,
        }
    }
}

/// Every record's data, or the first damaged record's offset and what is wrong with it.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>, RecordError> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let cut = |need: usize| RecordError::Truncated {
            offset,
            have: rest.len(),
            need,
        };
        let header = rest.get(..12).ok_or_else(|| cut(12))?;
        let (length, crc) = header.split_at(8);
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != masked_crc(length) {
            return Err(RecordError::LengthChecksum { offset });
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(length);
        let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| cut(usize::MAX))?;
        let need = len.checked_add(16).ok_or_else(|| cut(usize::MAX))?;
        let record = rest.get(..need).ok_or_else(|| cut(need))?;
        let (data, crc) = record[12..].split_at(len);
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != masked_crc(data) {
            return Err(RecordError::DataChecksum { offset });
        }
        records.push(data);
        offset += need;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC32C("123456789") = 0xE3069283 (the Castagnoli check value), masked by hand.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let expected = 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), expected);
    }

    #[test]
    fn records_round_trip() {
        let mut file = Vec::new();
        append_record(&mut file, b"first");
        append_record(&mut file, b"");
        append_record(&mut file, &[7u8; 300]);
        let records = read_records(&file).expect("intact file");
        assert_eq!(records, vec![&b"first"[..], &b""[..], &[7u8; 300][..]]);
    }

    #[test]
    fn damage_is_named_with_its_offset() {
        let mut file = Vec::new();
        append_record(&mut file, b"first");
        append_record(&mut file, b"second");
        let second = 16 + 5;
        let mut flipped = file.clone();
        flipped[second + 12] ^= 0x01;
        assert_eq!(
            read_records(&flipped),
            Err(RecordError::DataChecksum { offset: second })
        );
        let mut length = file.clone();
        length[second] ^= 0x01;
        assert_eq!(
            read_records(&length),
            Err(RecordError::LengthChecksum { offset: second })
        );
        let cut = &file[..file.len() - 2];
        assert!(matches!(
            read_records(cut),
            Err(RecordError::Truncated { offset, .. }) if offset == second
        ));
    }
}
