//! `#[derive(FromRow)]` for pgstack: a struct read from a row, each field
//! from the column of its name. Use it through the facade,
//! `#[derive(pgstack::FromRow)]`.
//!
//! Field attributes: `#[pgstack(rename = "column")]` reads another column;
//! `#[pgstack(flatten)]` reads the field (itself `FromRow`) from the same
//! row. A nullable column is an `Option<T>` field. Container attribute:
//! `#[pgstack(crate = "pgstack_connection")]` when the facade is not a
//! dependency (default: `::pgstack`).
//!
//! Each field is read with `pgstack::column`, so a missing column, a
//! PostgreSQL type the field cannot be read from, a `NULL` for a field that
//! is not an `Option`, or a value that does not decode is a `RowError`
//! naming the column, the Rust type and the PostgreSQL type, never a panic;
//! the query methods turn it into `pgstack::Error::RowMapping`.
//!
//! Why a crate of its own rather than `postgres-from-row` or
//! `tokio-pg-mapper`: both generate code against `tokio_postgres` paths the
//! service must depend on itself, and report mismatches as a bare
//! `tokio_postgres::Error` (`postgres-from-row`: the column's index and the
//! decoder's message) or only a missing column (`tokio-pg-mapper`); neither
//! names the Rust and the PostgreSQL types. This derive is a few dozen lines
//! over `syn` and `quote` and generates calls to pgstack's own reader.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input};

/// Implements `FromRow` for a struct with named fields: each field from the
/// column of its name (or `#[pgstack(rename = "..")]`), or, with
/// `#[pgstack(flatten)]`, from the whole row.
///
/// ```ignore
/// #[derive(pgstack::FromRow)]
/// struct Bill {
///     id: i64,
///     #[pgstack(rename = "amount_cents")]
///     amount: i64,
///     note: Option<String>,
/// }
/// ```
#[proc_macro_derive(FromRow, attributes(pgstack))]
pub fn derive_from_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let krate = crate_path(input)?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "FromRow can be derived for structs with named fields only",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "FromRow can be derived for structs with named fields only (columns are read by name)",
        ));
    };
    let mut reads = Vec::new();
    for field in &fields.named {
        let Some(ident) = &field.ident else {
            continue;
        };
        let ty = &field.ty;
        let options = FieldOptions::parse(field)?;
        let read = if options.flatten {
            quote! { <#ty as #krate::FromRow>::from_row(row)? }
        } else {
            let column = options
                .rename
                .unwrap_or_else(|| ident.to_string().trim_start_matches("r#").to_owned());
            quote! { #krate::column::<#ty>(row, #column)? }
        };
        reads.push(quote! { #ident: #read });
    }
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics #krate::FromRow for #name #ty_generics #where_clause {
            fn from_row(
                row: &#krate::tokio_postgres::Row,
            ) -> ::core::result::Result<Self, #krate::RowError> {
                ::core::result::Result::Ok(Self { #(#reads),* })
            }
        }
    })
}

/// `#[pgstack(crate = "..")]`, or `::pgstack`.
fn crate_path(input: &DeriveInput) -> syn::Result<syn::Path> {
    let mut path = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("pgstack")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let value: LitStr = meta.value()?.parse()?;
                path = Some(value.parse::<syn::Path>()?);
                Ok(())
            } else {
                Err(meta.error("unknown pgstack attribute; expected `crate = \"..\"`"))
            }
        })?;
    }
    Ok(path.unwrap_or_else(|| syn::parse_quote!(::pgstack)))
}

#[derive(Default)]
struct FieldOptions {
    rename: Option<String>,
    flatten: bool,
}

impl FieldOptions {
    fn parse(field: &syn::Field) -> syn::Result<FieldOptions> {
        let mut options = FieldOptions::default();
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("pgstack")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    let value: LitStr = meta.value()?.parse()?;
                    options.rename = Some(value.value());
                    Ok(())
                } else if meta.path.is_ident("flatten") {
                    options.flatten = true;
                    Ok(())
                } else {
                    Err(meta.error(
                        "unknown pgstack attribute; expected `rename = \"column\"` or `flatten`",
                    ))
                }
            })?;
        }
        if options.flatten && options.rename.is_some() {
            return Err(syn::Error::new_spanned(
                field,
                "`flatten` reads the whole row; it cannot be combined with `rename`",
            ));
        }
        Ok(options)
    }
}
