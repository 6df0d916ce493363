//! Parameter types for statements sent without a named prepared statement
//! (`query.prepared_statements = false`, behind transaction-mode poolers).
//!
//! tokio-postgres's `query_typed` sends Parse/Bind/Execute on the unnamed
//! statement in one round trip, so nothing outlives the statement on the
//! server connection a pooler lent us; but it needs each parameter's type
//! up front. The type is taken from the Rust value, as sqlx does: the first
//! of a list of common PostgreSQL types that the value accepts.

use bytes::BytesMut;
use tokio_postgres::types::{ToSql, Type};

/// The types tried, in order. Wider integer and float types are not tried
/// before narrower ones: each Rust integer type accepts exactly one of them.
const CANDIDATES: [Type; 37] = [
    Type::BOOL,
    Type::INT8,
    Type::INT4,
    Type::INT2,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::TEXT,
    Type::BYTEA,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::UUID,
    Type::JSONB,
    Type::NUMERIC,
    Type::INET,
    Type::CHAR,
    Type::OID,
    Type::INTERVAL,
    Type::MACADDR,
    Type::BIT,
    Type::VARBIT,
    Type::POINT,
    Type::BOX,
    Type::PATH,
    Type::BOOL_ARRAY,
    Type::INT8_ARRAY,
    Type::INT4_ARRAY,
    Type::INT2_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::UUID_ARRAY,
    Type::JSONB_ARRAY,
    Type::NUMERIC_ARRAY,
];

/// The PostgreSQL type a parameter is sent as, or `None` when none of the
/// candidates accepts it (then use an explicitly typed call).
pub(crate) fn infer(value: &(dyn ToSql + Sync)) -> Option<Type> {
    let mut scratch = BytesMut::new();
    CANDIDATES.iter().find_map(|ty| {
        scratch.clear();
        value
            .to_sql_checked(ty, &mut scratch)
            .ok()
            .map(|_| ty.clone())
    })
}

/// Every parameter with its type, or the index of the first one whose type
/// cannot be told.
pub(crate) fn typed<'a>(
    params: &[&'a (dyn ToSql + Sync)],
) -> Result<Vec<(&'a (dyn ToSql + Sync), Type)>, usize> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| infer(*p).map(|ty| (*p, ty)).ok_or(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_rust_types_map_to_their_postgres_types() {
        let cases: [(&(dyn ToSql + Sync), Type); 10] = [
            (&true, Type::BOOL),
            (&1_i64, Type::INT8),
            (&1_i32, Type::INT4),
            (&1_i16, Type::INT2),
            (&1.5_f64, Type::FLOAT8),
            (&1.5_f32, Type::FLOAT4),
            (&"text", Type::TEXT),
            (&String::from("owned"), Type::TEXT),
            (&vec![1_u8, 2], Type::BYTEA),
            (&None::<i64>, Type::INT8),
        ];
        for (value, expected) in cases {
            assert_eq!(infer(value), Some(expected), "{value:?}");
        }
        assert_eq!(infer(&vec![1_i64, 2]), Some(Type::INT8_ARRAY));
        assert_eq!(infer(&vec!["a", "b"]), Some(Type::TEXT_ARRAY));
        assert_eq!(
            infer(&std::time::SystemTime::UNIX_EPOCH),
            Some(Type::TIMESTAMPTZ)
        );
    }

    #[test]
    fn an_unknown_type_is_reported_by_index() {
        let hstore = std::collections::HashMap::<String, Option<String>>::new();
        assert_eq!(infer(&hstore), None);
        let params: [&(dyn ToSql + Sync); 2] = [&1_i64, &hstore];
        assert_eq!(typed(&params).err(), Some(1));
    }
}
