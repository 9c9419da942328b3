//! Wire names of enums, written nowhere by hand: every wire enum derives its names from its
//! variants' names in snake_case, for serde (`#[serde(rename_all = "snake_case")]`) and for
//! text (`strum`: `as_str`, `Display`, `FromStr`, the list of names). [`parse`] reads one
//! from a person, saying which names exist when it does not know one.

use std::str::FromStr;

use strum::VariantNames;

/// `text` as a `T`, or a message listing the names `T` has.
pub fn parse<T: FromStr + VariantNames>(text: &str) -> Result<T, String> {
    text.parse().map_err(|_| {
        format!(
            "unknown value `{text}` (one of: {})",
            T::VARIANTS.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ErrorCode;
    use crate::model::{
        DetachedReason, EndReason, FileUserState, ForkState, ImportMethod, ReadPath, RefusalReason,
        VmBackend, VmState, VmmKind,
    };
    use crate::prefetch::Prefetch;
    use serde::Serialize;
    use strum::VariantArray;

    /// serde's name of every variant is the text name, and the text name parses back.
    fn agree<T>()
    where
        T: VariantArray + VariantNames + Serialize + FromStr + PartialEq + std::fmt::Debug,
        for<'a> &'a T: Into<&'static str>,
    {
        assert_eq!(
            <T as VariantArray>::VARIANTS.len(),
            <T as VariantNames>::VARIANTS.len()
        );
        for v in <T as VariantArray>::VARIANTS {
            let name: &'static str = v.into();
            assert_eq!(serde_json::to_value(v).unwrap(), name, "{v:?}");
            assert_eq!(parse::<T>(name).as_ref(), Ok(v), "{name}");
        }
    }

    #[test]
    fn every_wire_enum_has_one_spelling_for_json_and_text() {
        agree::<ErrorCode>();
        agree::<ForkState>();
        agree::<EndReason>();
        agree::<DetachedReason>();
        agree::<RefusalReason>();
        agree::<ImportMethod>();
        agree::<ReadPath>();
        agree::<FileUserState>();
        agree::<VmmKind>();
        agree::<VmBackend>();
        agree::<VmState>();
        agree::<Prefetch>();
        assert_eq!(Prefetch::WorkingSet.as_str(), "working_set");
        assert_eq!(ForkState::Detached.to_string(), "detached");
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = parse::<VmBackend>("disk").unwrap_err();
        assert_eq!(err, "unknown value `disk` (one of: uffd, file)");
    }
}
