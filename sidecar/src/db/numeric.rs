//! Binding exact decimals as PostgreSQL `numeric` in the binary wire format.

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use crate::aggregate::Decimal;

/// A [`Decimal`] bound as a PostgreSQL `numeric` in the binary format: exact, and no text
/// to allocate per value.
#[derive(Debug, Clone, Copy)]
pub struct SqlNumeric(pub Decimal);

impl SqlNumeric {
    /// The binary `numeric` wire form: ndigits, weight, sign, dscale (all i16), then base
    /// 10,000 digits, most significant first. PostgreSQL strips redundant zero digits. The
    /// display scale is the fewest fractional digits that show the value exactly (`42`,
    /// `0.005`), as [`Decimal`]'s `Display` writes it.
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
    pub fn encode(self, out: &mut BytesMut) {
        const SCALE: u128 = 1_000_000_000;
        let abs = self.0 .0.unsigned_abs();
        let mut dscale: i16 = 9;
        let mut f = abs % SCALE;
        if f == 0 {
            dscale = 0;
        } else {
            while f % 10 == 0 {
                f /= 10;
                dscale -= 1;
            }
        }
        let (mut int, frac) = (abs / SCALE, (abs % SCALE) * 1000); // 12 fractional digits
        let mut int_groups = Vec::new();
        while int > 0 {
            int_groups.push((int % 10_000) as i16);
            int /= 10_000;
        }
        int_groups.reverse();
        let frac_groups = [
            (frac / 100_000_000) as i16,
            ((frac / 10_000) % 10_000) as i16,
            (frac % 10_000) as i16,
        ];
        let ndigits = (int_groups.len() + frac_groups.len()) as i16;
        let weight = int_groups.len() as i16 - 1;
        let sign: u16 = if self.0 .0 < 0 { 0x4000 } else { 0 };
        out.put_i16(ndigits);
        out.put_i16(weight);
        out.put_u16(sign);
        out.put_i16(dscale);
        for d in int_groups.iter().chain(frac_groups.iter()) {
            out.put_i16(*d);
        }
    }
}

impl ToSql for SqlNumeric {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.encode(out);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}
