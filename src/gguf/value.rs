//! GGUF metadata values: the value type codes (one table) and the typed values.

use std::fmt;

/// Declares [`ValueType`] and its table from one list, so every variant has exactly one row and
/// a row is found by indexing with the variant.
macro_rules! value_types {
    ($($variant:ident = $code:literal, $name:literal, $size:literal;)*) => {
        /// A GGUF value type code (ggml `docs/gguf.md`, `gguf_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ValueType {
            $($variant),*
        }

        /// (type, code, name, fixed size in bytes; 0 for strings and arrays), one table, in
        /// declaration order: row `i` is variant `i`.
        const VALUE_TYPES: &[(ValueType, u32, &str, u64)] =
            &[$((ValueType::$variant, $code, $name, $size)),*];
    };
}

value_types! {
    U8 = 0, "u8", 1;
    I8 = 1, "i8", 1;
    U16 = 2, "u16", 2;
    I16 = 3, "i16", 2;
    U32 = 4, "u32", 4;
    I32 = 5, "i32", 4;
    F32 = 6, "f32", 4;
    Bool = 7, "bool", 1;
    String = 8, "string", 0;
    Array = 9, "array", 0;
    U64 = 10, "u64", 8;
    I64 = 11, "i64", 8;
    F64 = 12, "f64", 8;
}

impl ValueType {
    pub fn from_code(code: u32) -> Option<ValueType> {
        VALUE_TYPES.iter().find(|r| r.1 == code).map(|r| r.0)
    }

    /// Parse a type name as used by `--set KEY=TYPE:VALUE` (`str` is accepted for `string`).
    pub fn from_name(name: &str) -> Option<ValueType> {
        let name = name.trim().to_ascii_lowercase();
        let name = if name == "str" { "string" } else { &name };
        VALUE_TYPES.iter().find(|r| r.2 == name).map(|r| r.0)
    }

    fn row(self) -> &'static (ValueType, u32, &'static str, u64) {
        &VALUE_TYPES[self as usize]
    }

    pub fn code(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Encoded size of one value of a fixed-size type; None for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        match self.row().3 {
            0 => None,
            n => Some(n),
        }
    }

    /// Smallest encoded size of one value (a string is at least its 8-byte length).
    pub fn min_size(self) -> u64 {
        match self {
            ValueType::String => 8,
            ValueType::Array => 12,
            t => t.row().3,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of an array, typed. Strings are kept as raw bytes so any file is carried through
/// byte for byte (token texts are not always valid UTF-8).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<Vec<u8>>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

macro_rules! each_array {
    ($a:expr, $v:ident => $e:expr) => {
        match $a {
            Array::U8($v) => $e,
            Array::I8($v) => $e,
            Array::U16($v) => $e,
            Array::I16($v) => $e,
            Array::U32($v) => $e,
            Array::I32($v) => $e,
            Array::F32($v) => $e,
            Array::Bool($v) => $e,
            Array::String($v) => $e,
            Array::U64($v) => $e,
            Array::I64($v) => $e,
            Array::F64($v) => $e,
        }
    };
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        each_array!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty array of `elem` (None for arrays of arrays).
    pub fn empty(elem: ValueType) -> Option<Array> {
        Some(match elem {
            ValueType::U8 => Array::U8(Vec::new()),
            ValueType::I8 => Array::I8(Vec::new()),
            ValueType::U16 => Array::U16(Vec::new()),
            ValueType::I16 => Array::I16(Vec::new()),
            ValueType::U32 => Array::U32(Vec::new()),
            ValueType::I32 => Array::I32(Vec::new()),
            ValueType::F32 => Array::F32(Vec::new()),
            ValueType::Bool => Array::Bool(Vec::new()),
            ValueType::String => Array::String(Vec::new()),
            ValueType::U64 => Array::U64(Vec::new()),
            ValueType::I64 => Array::I64(Vec::new()),
            ValueType::F64 => Array::F64(Vec::new()),
            ValueType::Array => return None,
        })
    }

    /// Element `i` as a scalar value.
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::String(v) => Value::String(v.get(i)?.clone()),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
        })
    }

    /// Encoded size of the elements (without the type code and count).
    pub fn encoded_len(&self) -> u64 {
        match self {
            Array::String(v) => v.iter().map(|s| 8 + s.len() as u64).sum(),
            a => a.len() as u64 * a.elem_type().fixed_size().unwrap_or(0),
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    /// Raw bytes; GGUF strings should be UTF-8, but readers carry any bytes.
    String(Vec<u8>),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// A string value.
    pub fn string(s: impl Into<String>) -> Value {
        Value::String(s.into().into_bytes())
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// "u32", "string", "array[string]".
    pub fn type_label(&self) -> String {
        match self {
            Value::Array(a) => format!("array[{}]", a.elem_type()),
            v => v.value_type().name().to_string(),
        }
    }

    /// The string, when this is a valid UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            Value::I8(x) => Some(x as f64),
            Value::I16(x) => Some(x as f64),
            Value::I32(x) => Some(x as f64),
            Value::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// Encoded size of the value (without its type code).
    pub fn encoded_len(&self) -> u64 {
        match self {
            Value::String(s) => 8 + s.len() as u64,
            Value::Array(a) => 4 + 8 + a.encoded_len(),
            v => v.value_type().fixed_size().unwrap_or(0),
        }
    }

    /// Parse a scalar of type `ty` from text (`--set KEY=TYPE:VALUE`).
    pub fn parse(ty: ValueType, text: &str) -> Result<Value, ValueParseError> {
        let num = |t: &str| ValueParseError::Number {
            text: t.to_string(),
            ty: ty.name(),
        };
        fn n<T: std::str::FromStr>(t: &str) -> Option<T> {
            t.trim().parse::<T>().ok()
        }
        Ok(match ty {
            ValueType::U8 => Value::U8(n(text).ok_or_else(|| num(text))?),
            ValueType::I8 => Value::I8(n(text).ok_or_else(|| num(text))?),
            ValueType::U16 => Value::U16(n(text).ok_or_else(|| num(text))?),
            ValueType::I16 => Value::I16(n(text).ok_or_else(|| num(text))?),
            ValueType::U32 => Value::U32(n(text).ok_or_else(|| num(text))?),
            ValueType::I32 => Value::I32(n(text).ok_or_else(|| num(text))?),
            ValueType::F32 => Value::F32(n(text).ok_or_else(|| num(text))?),
            ValueType::U64 => Value::U64(n(text).ok_or_else(|| num(text))?),
            ValueType::I64 => Value::I64(n(text).ok_or_else(|| num(text))?),
            ValueType::F64 => Value::F64(n(text).ok_or_else(|| num(text))?),
            ValueType::Bool => match text.trim() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                other => return Err(ValueParseError::Bool(other.to_string())),
            },
            ValueType::String => Value::string(text),
            ValueType::Array => return Err(ValueParseError::Array),
        })
    }

    /// JSON form; arrays longer than `max_items` (when given) are summarized as
    /// `{"type", "len", "first": [...]}`.
    pub fn to_json(&self, max_items: Option<usize>) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Array(a) => {
                let n = a.len();
                let shown = max_items.map_or(n, |m| m.min(n));
                let items: Vec<serde_json::Value> = (0..shown)
                    .filter_map(|i| a.get(i))
                    .map(|v| v.to_json(None))
                    .collect();
                if shown < n {
                    json!({"type": a.elem_type().name(), "len": n, "first": items})
                } else {
                    serde_json::Value::Array(items)
                }
            }
            Value::String(b) => json!(String::from_utf8_lossy(b)),
            Value::Bool(b) => json!(b),
            Value::F32(x) => float_json(*x as f64),
            Value::F64(x) => float_json(*x),
            Value::I8(x) => json!(x),
            Value::I16(x) => json!(x),
            Value::I32(x) => json!(x),
            Value::I64(x) => json!(x),
            v => json!(v.as_u64()),
        }
    }
}

fn float_json(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x)
        .map(serde_json::Value::Number)
        .unwrap_or_else(|| serde_json::Value::String(x.to_string()))
}

impl fmt::Display for Value {
    /// Scalars in full; arrays as their length and first few items.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Value::Array(a) => {
                write!(f, "[")?;
                let n = a.len();
                for i in 0..n.min(8) {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    if let Some(v) = a.get(i) {
                        write!(f, "{v}")?;
                    }
                }
                if n > 8 {
                    write!(f, ", ... ({n} items)")?;
                }
                write!(f, "]")
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::F32(x) => write!(f, "{x}"),
            Value::F64(x) => write!(f, "{x}"),
            Value::I8(x) => write!(f, "{x}"),
            Value::I16(x) => write!(f, "{x}"),
            Value::I32(x) => write!(f, "{x}"),
            Value::I64(x) => write!(f, "{x}"),
            v => write!(f, "{}", v.as_u64().unwrap_or(0)),
        }
    }
}

/// Why `--set KEY=TYPE:VALUE` text is not a value of its type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueParseError {
    #[error("{text:?} is not a valid {ty}")]
    Number { text: String, ty: &'static str },
    #[error("{0:?} is not true or false")]
    Bool(String),
    #[error("arrays cannot be set from the command line")]
    Array,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_type_round_trips_through_its_row() {
        for (i, &(ty, code, name, _)) in VALUE_TYPES.iter().enumerate() {
            assert_eq!(ty as usize, i, "{name}: row out of declaration order");
            assert_eq!((ty.code(), ty.name()), (code, name));
            assert_eq!(ValueType::from_code(code), Some(ty));
            assert_eq!(ValueType::from_name(name), Some(ty));
        }
    }
}
